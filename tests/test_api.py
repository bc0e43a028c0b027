"""The public API is what __all__ says, and every listed name resolves."""

from __future__ import annotations

import importlib
import pkgutil

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
