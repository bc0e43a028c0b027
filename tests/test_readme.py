"""Every command block of README.md runs, and exits 0.

The README's ```bash, ```sh and ```console blocks are parsed (a trailing backslash joins lines, ``#`` starts a
comment, ``$`` marks a console command, ``&&`` separates commands); every ``dasgd ...`` command runs in a
temporary directory, shortened where the README's own budget would take minutes (fewer real workers, a
gradient budget instead of seconds, no theory estimates; see :func:`shortened`). Setup commands (pip, apt-get,
a virtual environment) are not run: the test environment is installed already. Blocks that hold no command to
run here (a torchrun job across machines, a Python fragment, a synopsis of flags) are listed in ``SKIPPED``
with the reason; a block that is neither run nor listed fails the first test, so no block is silently ignored.

The README's diverging example (64 workers at lr 0.02 on the quadratic, loss 16 -> 1,509) would now exit 3:
this test is what keeps every example runnable as written.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUN_LANGS = ("bash", "sh", "console")
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "apt-get", "sudo apt-get", "(apt-get")
"""Setup commands: the environment that runs this test has them done."""

SKIPPED = {
    ". .venv/bin/activate && pip install -e '.[test]'": "runs the whole test suite (this test is part of it)",
    "# on each of 2 machines (HOST = the first one):": "a torchrun job across two machines; "
    "tests/test_multiprocess.py runs two torchrun nodes of two processes on loopback",
    "trainer = dasgd.DecentralizedSGD(model, optimizer)": "a fragment of examples/torchrun_dasgd.py, "
    "which tests/test_multiprocess.py runs whole",
    "dasgd train [--spec FILE] [--task T] [--workers N]": "a synopsis of the flags, not a command",
}
"""Blocks not run, by the start of their first line, with the reason."""

TIME_LIMIT = 150
"""Seconds one shortened command may take (the whole file takes about 2-3 minutes on 2 busy cores)."""


def _skipped(body: str) -> bool:
    """Whether the block is listed in SKIPPED (its first line starts with a listed line)."""
    first = body.splitlines()[0] if body.strip() else ""
    return any(first.startswith(key) for key in SKIPPED)


def blocks() -> list[tuple[int, str, str]]:
    """``(line, language, body)`` of every fenced block of the README."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        out.append((text[: m.start()].count("\n") + 1, m.group(1), m.group(2)))
    return out


def commands(body: str, lang: str) -> list[str]:
    """The commands of a shell block: console lines start with ``$``; continuation lines are joined."""
    lines = body.splitlines()
    if lang == "console":
        lines = [ln[2:] for ln in lines if ln.startswith("$ ")]
    joined, out = "", []
    for line in lines:
        line = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        joined += line
        if joined.strip():
            out += [part.strip() for part in joined.split("&&")]
        joined = ""
    return out


def dasgd_commands() -> list[tuple[str, str]]:
    """``(id, command)`` of every dasgd command to run, by README line."""
    out = []
    for line, lang, body in blocks():
        if lang not in RUN_LANGS or _skipped(body):
            continue
        for i, cmd in enumerate(commands(body, lang)):
            if cmd.startswith("dasgd "):
                out.append((f"line{line}-{i}-{cmd.split()[1]}", cmd))
    return out


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    unknown = []
    for line, lang, body in blocks():
        first = body.splitlines()[0] if body.strip() else ""
        if _skipped(body):
            continue
        if lang in RUN_LANGS:
            cmds = commands(body, lang)
            others = [c for c in cmds if not c.startswith("dasgd ") and not c.startswith(SETUP)]
            if cmds and not others:
                continue
        if lang == "" and first.startswith("$ "):
            unknown.append(f"line {line}: a console transcript fenced without ```console")
            continue
        unknown.append(f"line {line}: ```{lang} {first!r}")
    assert not unknown, "README blocks neither run nor listed in SKIPPED:\n" + "\n".join(unknown)
    assert len(dasgd_commands()) >= 7


def _set(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag`` (and its value) removed, then added with ``value`` (None: removed only)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = not (i + 1 < len(argv) and argv[i + 1].startswith("--"))
            continue
        out.append(a)
    return out if value is None else out + [flag, value]


def shortened(argv: list[str], tmp: Path) -> list[str]:
    """The README command made short and put in ``tmp``: what changes and why is said per flag."""
    command = argv[1]
    quadratic = "quadratic" in argv
    if command in ("train", "compare") or (command == "simulate" and not quadratic):
        # A gradient budget instead of seconds (machine-dependent). Simulations of the quadratic keep the
        # README's budget: a shorter run would hide a divergence (the old example blew up after 1,793
        # gradients). MNIST and digits evaluate on thousands of samples: at most a few evaluations per run.
        argv = _set(argv, "--max-seconds", None)
        argv = _set(argv, "--max-gradients", "200" if command == "compare" else "300")
        if command != "train":
            argv = _set(argv, "--eval-every", "1.0" if command == "compare" else "0.05")
    if command in ("train", "simulate", "compare"):
        argv += ["--no-progress", "--no-theory"]  # estimates of L and sigma: tested in test_theory.py
    if command in ("train", "compare"):
        # Real processes on 2 shared cores: 2 workers, not 4 (a straggler rank above 1 is renamed 1).
        argv = _set(argv, "--workers", "2")
        argv = [re.sub(r"^[2-9]x", "1x", a) for a in argv]
    if command == "compare":
        # Five algorithms in real processes take minutes; the simulator runs the same workers. Their per-run
        # plots are left out (the comparison's own overlay plots are drawn).
        argv += ["--simulate", "--no-plots"]
    if command in ("train", "simulate") and "--run-dir" not in argv:
        argv += ["--run-dir", str(tmp / "run")]
    return [a if not a.startswith("runs/") else str(tmp / a) for a in argv]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dasgd", *argv[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("cmd", [c for _, c in dasgd_commands()], ids=[i for i, _ in dasgd_commands()])
def test_readme_command_runs(cmd: str, tmp_path: Path) -> None:
    argv = shlex.split(cmd)
    if "--calibrate" in argv:
        # The README replays an earlier mnist-logreg run: make one (small) to replay.
        real = tmp_path / "real"
        done = run(shortened(["dasgd", "train", "--task", "mnist-logreg", "--run-dir", str(real)], tmp_path),
                   tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
        argv = [str(real) if a.startswith("runs/mnist-logreg-") else a for a in argv]
    argv = shortened(argv, tmp_path)
    proc = run(argv, tmp_path)
    if proc.returncode == 2 and "dasgd: error:" in proc.stderr and "install" in proc.stderr:
        pytest.skip(f"a dataset is not installed here: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert "diverged" not in proc.stderr  # a sweep's diverged point is a note, not an exit code: none here
