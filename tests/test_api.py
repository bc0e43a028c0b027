"""The public API is what __all__ says, and every listed name resolves."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import dasgd


def test_dir_of_the_package_shows_only_the_public_names():
    public = {n for n in dir(dasgd) if not n.startswith("_")}
    assert public == set(dasgd.__all__)
    for name in dasgd.__all__:
        assert getattr(dasgd, name) is not None


def test_every_module_lists_its_public_names_and_each_one_exists():
    """Each module's __all__ is explicit and holds only names it defines or re-exports."""
    missing = []
    for info in pkgutil.walk_packages(dasgd.__path__, "dasgd."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if names is None:
            missing.append(info.name)
            continue
        for name in names:
            assert hasattr(module, name), f"{info.name}.__all__ names {name!r}, which it does not define"
    assert missing == [], f"modules without __all__: {missing}"


def _no_launch(monkeypatch):
    def launch(*a, **k):
        raise AssertionError("a worker process was started for a spec that should have been refused")

    monkeypatch.setattr("dasgd.runs.launcher.launch_local", launch)


def test_train_refuses_a_bad_topology_before_starting_any_process(monkeypatch, tmp_path):
    """dasgd.train(topology="star") started processes and failed with their traceback; now it is refused
    before anything starts, as `dasgd train` does, and no run directory is written."""
    _no_launch(monkeypatch)
    with pytest.raises(dasgd.SpecError, match=r"^topology: unknown topology 'star'") as info:
        dasgd.train(task="quadratic", workers=4, topology="star", run_dir=str(tmp_path / "r"))
    assert info.value.flag == "topology"
    with pytest.raises(dasgd.SpecError, match=r"^algorithm: sync averages over every worker.*use topology"):
        dasgd.train(task="quadratic", workers=4, algorithm="sync", topology="ring", run_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"bogus": 1}, "bogus"),
        ({"max_gradients": 0}, "max_gradients"),
        ({"stragglers": ["9x2"]}, "stragglers"),  # its CLI flag is --straggler
        ({"secret_env": "DASGD_TEST_UNSET_VARIABLE"}, "secret_env"),
        ({"simulation": {"crash": 1}}, "simulation.crash"),
    ],
)
def test_errors_from_train_name_python_arguments_not_cli_flags(monkeypatch, tmp_path, kw, named):
    _no_launch(monkeypatch)
    monkeypatch.delenv("DASGD_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(dasgd.SpecError) as info:
        dasgd.train(task="quadratic", workers=2, run_dir=str(tmp_path / "r"), **kw)
    assert info.value.flag == named
    assert str(info.value).startswith(f"{named}: ")
    assert "--" not in str(info.value), str(info.value)


def test_the_cli_still_names_its_flags(tmp_path, capsys):
    from dasgd.cli import main

    assert main(["train", "--task", "quadratic", "--straggler", "9x2", "--workers", "2"]) == 2
    assert "--straggler" in capsys.readouterr().err


def test_help_shows_the_wrapper_its_report_train_and_the_errors():
    import pydoc

    text = pydoc.render_doc(dasgd, renderer=pydoc.plaintext)
    for name in ("DecentralizedSGD", "FinishReport", "train", "DasgdError", "SpecError", "ModelChangedError"):
        assert name in dasgd.__all__
        assert f"class {name}" in text or f"{name}(" in text, name


def test_every_exported_error_is_a_dasgd_error_and_the_builtin_a_caller_expects():
    errors = [getattr(dasgd, n) for n in dasgd.__all__ if n.endswith(("Error", "Failed", "Timeout"))]
    assert len(errors) >= 12
    for cls in errors:
        assert issubclass(cls, dasgd.DasgdError), cls
        assert issubclass(cls, ValueError | RuntimeError | TimeoutError | FloatingPointError) or cls is (
            dasgd.DasgdError
        ), cls
    assert issubclass(dasgd.SpecError, ValueError) and issubclass(dasgd.DrainTimeoutError, TimeoutError)
    assert issubclass(dasgd.DivergedError, FloatingPointError) and issubclass(dasgd.RunFailed, RuntimeError)
