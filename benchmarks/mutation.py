"""Mutation testing of dasgd's core with mutmut: which small code changes do the fast tests fail to notice?

mutmut 3 (``pip install mutmut==3.8.1``, or ``pip install -e '.[mutation]'``) makes many small changes
("mutants") to the functions of the modules in ``[tool.mutmut] only_mutate`` of pyproject.toml (``core/*``,
``worker/*``, ``transport/queue.py``), one at a time, and runs the fast, pure-logic tests of
``pytest_add_cli_args_test_selection`` against each; a mutant the tests fail on is *killed*, one they pass on
*survived*. A first full test run records which tests call which function, so each mutant runs only those
tests, and stops at the first failure.

    python benchmarks/mutation.py [--only core/ledger.py,transport/queue.py] [--jobs N] [--keep DIR]
                                  [--fail-under PCT] [--out results.json]

It copies ``src/``, ``tests/`` and ``pyproject.toml`` of the work tree into a temporary folder (``--keep DIR``:
into DIR, kept for ``cd DIR && mutmut browse`` or ``mutmut show NAME``), runs ``mutmut run`` there and
removes the folder: the work tree is left as it was. ``--only`` narrows ``only_mutate`` in the copy to the
named modules or folders (relative to ``src/dasgd``). Progress is printed every ``--progress`` seconds.

At the end it prints, per module, the mutants made, killed, survived, timed out and otherwise unresolved
(no test reached them, or mutmut found the run suspicious), the kill rate, and the kill rate excluding the
surviving mutants recorded as equivalent in ``benchmarks/mutation_equivalent.txt`` (mutants whose behaviour
cannot differ from the original's, so that no test can kill them). Kill rate = (killed + timed out) / made,
where made counts the mutants no test reaches too; a timed-out mutant (mutmut stops its tests after 30 x
(their measured time + 1 s) of CPU) was noticed. Then it lists every mutant that the tests ran against and
did not kill, with its line, its diff and its fingerprint (``NAME FINGERPRINT`` is the key of
``mutation_equivalent.txt``), and the functions no selected test calls. An entry of the equivalent file
whose mutant no longer survives, or whose fingerprint no longer matches (the function changed and the
numbering of its mutants moved), is reported as stale and excuses nothing.

Where the time goes (measured on 2 cores, the whole set of 4,527 mutants, other work taking a third of the
CPU): 14-17 minutes. Copying and generating the mutants (libcst) ~25 s, the first full test run that maps
tests to functions ~10 s, the clean and forced-fail runs ~7 s, then the mutants, 2 at a time, about 5 a
second. A mutant costs a fork of the prepared mutmut process plus a pytest session over the tests that call
its function (0.1-1 s): of the ~30 CPU-minutes the mutants took, core/topology.py took a third (its tree and
flooding tests), wire.py a fifth, worker.py a sixth, ledger.py a tenth. Mutants that no selected test reaches
cost nothing. ``--only`` runs one module in 1-5 minutes.

Not a test: pytest does not collect it, CI does not run it. Exit status: 0 when it ran (1 with
``--fail-under`` when a module's kill rate excluding equivalents is below PCT), 1 when mutmut failed, 2 when
mutmut is not installed (it installs nothing itself).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fnmatch
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import _common

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = Path(__file__).resolve().parent / "mutation_equivalent.txt"
MUTMUT_VERSION = "3.8.1"
PIP_COMMAND = f"pip install mutmut=={MUTMUT_VERSION}   (or: pip install -e '.[mutation]')"
PACKAGE = "src/dasgd"
# What the copy needs: the code, the tests, and pyproject.toml (mutmut's and pytest's configuration).
COPIED = ("src", "tests", "pyproject.toml")
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", ".hypothesis", ".pytest_cache", "*.pyc")
# mutmut's verdicts grouped into the table's columns.
KILLED = {"killed", "caught by type check"}
NOT_RUN = {"not checked", "skipped"}
NO_TESTS = "no tests"  # none of the selected tests calls the mutated function
# mutmut redraws one status line with "\r": "⠴ 812/4527  🎉 700 🫥 10  ⏰ 2  🤔 0  🙁 100  🔇 0  🧙 0".
STATUS_LINE = re.compile(r"(\d+)/(\d+)\s+🎉 (\d+) 🫥 (\d+)\s+⏰ (\d+)\s+🤔 (\d+)\s+🙁 (\d+)")
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
# The phases of `mutmut run`, as its spinner titles and headings name them.
PHASES = (
    "Generating mutants",
    "Running stats",
    "Listing all tests",
    "Running clean tests",
    "Running forced fail test",
    "Running mutation testing",
)
ONLY_MUTATE_LINE = re.compile(r"^only_mutate\s*=\s*(\[.*\])\s*$", re.MULTILINE)


@dataclass
class Mutant:
    """One mutant: mutmut's name (``dasgd.core.ledger.xǁClassǁmethod__mutmut_3``), its module, its verdict."""

    name: str
    module: str  # relative to src/dasgd, e.g. "core/ledger.py"
    status: str
    line: int | None = None
    diff: list[str] = field(default_factory=list)  # the changed lines, "-old" and "+new"
    function: str = ""  # "function" or "Class.method"
    function_line: int | None = None
    fingerprint: str = ""
    equivalent: bool = False


@dataclass
class Equivalent:
    """An entry of mutation_equivalent.txt: a surviving mutant whose behaviour cannot differ from the original."""

    name: str
    fingerprint: str
    reason: str


@dataclass
class ModuleRow:
    """The counts of one module (or of the total) for the final table."""

    module: str
    counts: Counter = field(default_factory=Counter)
    equivalent: int = 0

    @property
    def made(self) -> int:
        return sum(n for status, n in self.counts.items() if status not in NOT_RUN)

    @property
    def killed(self) -> int:
        return sum(self.counts[s] for s in KILLED)

    @property
    def other(self) -> int:
        """Runs mutmut found suspicious (a segfault, an interruption, an odd exit code)."""
        return self.made - self.killed - sum(self.counts[s] for s in ("survived", "timeout", NO_TESTS))

    def rate(self, excluding_equivalent: bool) -> float | None:
        """(killed + timed out) / made, optionally with the confirmed equivalent mutants left out of made."""
        made = self.made - (self.equivalent if excluding_equivalent else 0)
        return (self.killed + self.counts["timeout"]) / made if made > 0 else None


# --------------------------------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated modules or folders relative to src/dasgd (e.g. core/ledger.py,worker); "
        "default: all of [tool.mutmut] only_mutate",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="mutants tested in parallel")
    parser.add_argument("--keep", type=Path, help="work in this new (or empty) folder and keep it")
    parser.add_argument("--progress", type=float, default=15.0, help="seconds between progress lines")
    parser.add_argument("--fail-under", type=float, help="exit 1 if a module's rate excl. equivalents < PCT")
    parser.add_argument("--out", help="write the counts and the surviving mutants as JSON to this file")
    return parser.parse_args(argv)


def mutmut_problem() -> str | None:
    """Why mutmut cannot be used from this interpreter (None when it can). Installs nothing."""
    from importlib import metadata

    try:
        version = metadata.version("mutmut")
    except metadata.PackageNotFoundError:
        return "mutmut is not installed in this environment"
    if not version.startswith("3."):
        return f"mutmut {version} is installed; this script needs mutmut 3 (tested with {MUTMUT_VERSION})"
    return None


def selected_files(only: str, scope: list[str]) -> list[str]:
    """The files of ``--only`` (modules or folders under src/dasgd) that pyproject's ``only_mutate`` covers.

    Raises:
        SystemExit: a selection does not exist or holds nothing in scope.
    """
    files: list[str] = []
    for item in filter(None, (part.strip().strip("/") for part in only.split(","))):
        target = ROOT / PACKAGE / item
        candidates = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        chosen = [
            rel
            for rel in (path.relative_to(ROOT).as_posix() for path in candidates if path.is_file())
            if any(fnmatch.fnmatch(rel, pattern) for pattern in scope)
        ]
        if not chosen:
            raise SystemExit(f"--only {item}: no module of {PACKAGE}/{item} is in only_mutate {scope}")
        files += [rel for rel in chosen if rel not in files]
    return files


def narrow_only_mutate(pyproject: Path, only: str) -> None:
    """Rewrite ``only_mutate`` in the copy's pyproject.toml to the files of ``--only`` (no-op without it)."""
    text = pyproject.read_text()
    found = ONLY_MUTATE_LINE.search(text)
    if found is None:
        raise SystemExit("pyproject.toml: [tool.mutmut] needs only_mutate = [...] on one line")
    if not only:
        return
    # A one-line TOML array of double-quoted strings is also a Python literal.
    files = selected_files(only, list(ast.literal_eval(found.group(1))))
    line = "only_mutate = [" + ", ".join(f'"{f}"' for f in files) + "]"
    pyproject.write_text(text[: found.start()] + line + text[found.end() :])
    print(f"mutating only: {', '.join(files)}")


def copy_project(work: Path) -> None:
    """Copy what the tests and mutmut need into ``work``; caches and build leftovers stay behind."""
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=COPY_IGNORE)
        else:
            shutil.copy2(source, work / name)


@contextlib.contextmanager
def work_folder(keep: Path | None) -> Iterator[Path]:
    """A temporary folder removed afterwards, or ``keep`` (created if needed, must be empty) kept."""
    if keep is None:
        work = Path(tempfile.mkdtemp(prefix="dasgd-mutation-"))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    keep = keep.resolve()
    if keep.exists() and any(keep.iterdir()):
        raise SystemExit(f"--keep {keep}: the folder is not empty (mutmut would reuse stale results)")
    if keep == ROOT or ROOT in keep.parents:
        raise SystemExit(f"--keep {keep}: choose a folder outside the work tree")
    keep.mkdir(parents=True, exist_ok=True)
    yield keep


# ------------------------------------------------------------------------------------------------ running


class Progress:
    """Turns mutmut's spinner output into a few readable lines: phase changes and periodic counts."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.start = time.monotonic()
        self.phase = ""
        self.phase_start: dict[str, float] = {}
        self.last_print = 0.0
        self.status: tuple[int, ...] | None = None
        self.testing_start: float | None = None

    def stamp(self) -> str:
        minutes, seconds = divmod(int(time.monotonic() - self.start), 60)
        return f"[{minutes:3d}:{seconds:02d}]"

    def feed(self, fragment: str) -> None:
        """Handle one line (or one redraw of the status line) of mutmut's output."""
        text = fragment.strip().lstrip(SPINNER).strip()
        if not text:
            return
        status = STATUS_LINE.search(text)
        if status:
            self.status = tuple(int(x) for x in status.groups())
            if time.monotonic() - self.last_print >= self.every:
                self.print_status()
            return
        phase = next((p for p in PHASES if text.startswith(p)), None)
        if phase is not None:
            if phase != self.phase:
                self.phase = phase
                self.phase_start[phase] = time.monotonic() - self.start
                print(f"{self.stamp()} mutmut: {phase}", flush=True)
            return
        if text not in ("done", "Mutant results") and not text.startswith("---"):
            print(f"{self.stamp()} mutmut: {text}", flush=True)

    def print_status(self) -> None:
        """One line: mutants tested so far, their verdicts, and the time left at the rate so far."""
        if self.status is None:
            return
        done, total, killed, no_tests, timeout, suspicious, survived = self.status
        now = time.monotonic()
        self.last_print = now
        if self.testing_start is None:
            self.testing_start = now
        elapsed = now - self.testing_start
        left = ""
        # Mutants with no tests are settled at once, before any test runs: they say nothing of the pace.
        tested = done - no_tests
        if tested > 0 and elapsed > 5:
            rate = tested / elapsed
            left = f", {rate:.1f}/s, ~{(total - done) / rate / 60:.0f} min left"
        print(
            f"{self.stamp()} {done}/{total} mutants tested: killed {killed}, survived {survived}, "
            f"timeout {timeout}, no tests {no_tests}, suspicious {suspicious}{left}",
            flush=True,
        )


def pump(stream: io.BufferedReader, log: IO[bytes], progress: Progress) -> None:
    """Copy mutmut's output to the log and feed it, split at "\\r" and "\\n", to ``progress``."""
    pending = b""
    while chunk := stream.read1(65536):
        log.write(chunk)
        pending += chunk
        *pieces, pending = re.split(rb"[\r\n]", pending)
        for piece in pieces:
            progress.feed(piece.decode("utf-8", errors="replace"))
    progress.feed(pending.decode("utf-8", errors="replace"))


def run_mutmut(work: Path, jobs: int, every: float) -> tuple[int, dict[str, float], float]:
    """Run ``mutmut run`` in ``work``; return its exit status, the start of each phase (s), the total (s)."""
    # Imported as a module rather than `python -m mutmut`, which mutmut warns re-executes its __main__.
    command = [
        sys.executable,
        "-c",
        "import sys; from mutmut.__main__ import cli; sys.exit(cli())",
        "run",
        "--max-children",
        str(jobs),
    ]
    # One thread per test process: `jobs` of them already share the cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    progress = Progress(every)
    log_path = work / "mutmut.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            assert process.stdout is not None
            pump(process.stdout, log, progress)
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
            raise
    progress.print_status()
    if code != 0:
        tail = log_path.read_bytes().decode("utf-8", errors="replace").replace("\r", "\n").splitlines()
        print("mutmut failed; the end of its output:\n" + "\n".join(tail[-40:]))
    return code, progress.phase_start, time.monotonic() - progress.start


# ------------------------------------------------------------------------------------------------ results


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run the body with ``folder`` as the working directory (mutmut's helpers read paths relative to it)."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def read_verdicts(work: Path) -> list[Mutant]:
    """Every mutant mutmut made in ``work``, with its verdict, from mutmut's per-module ``.meta`` files."""
    import json

    from mutmut.stats import status_by_exit_code

    mutants = []
    source_root = work / "mutants" / PACKAGE
    for meta in sorted(source_root.rglob("*.py.meta")):
        module = meta.relative_to(source_root).as_posix()[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            mutants.append(Mutant(name=name, module=module, status=status_by_exit_code[code]))
    return mutants


def changed_lines(diff: str) -> list[str]:
    """The removed and added lines of a unified diff, each stripped of indentation after its sign."""
    return [
        line[0] + line[1:].strip()
        for line in diff.splitlines()
        if line[:1] in "-+" and not line.startswith(("---", "+++"))
    ]


def first_changed_offset(diff: str) -> int | None:
    """The 1-based line, within the diffed function, of the first removed line (None if none)."""
    old = 0
    for line in diff.splitlines():
        hunk = re.match(r"@@ -(\d+)", line)
        if hunk:
            old = int(hunk.group(1)) - 1
        elif line.startswith(("---", "+++")):
            continue
        elif line.startswith(" "):
            old += 1
        elif line.startswith("-"):
            return old + 1
    return None


def function_start(tree: ast.Module, name: str) -> int | None:
    """First line (decorators included) of a top-level function or a method of a top-level class.

    ``name`` is ``function`` or ``Class.method``, as mutmut's mutant names encode them.
    """
    *owner, function = name.split(".")
    body = tree.body
    if owner:
        classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == owner[0]]
        body = classes[0].body if classes else []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            return min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return None


def source_line(source: list[str], start: int | None, offset: int | None, removed: str | None) -> int | None:
    """The line of the source that the mutant changed.

    The diff covers the function alone (from its first line, or from comments just above it), so the line
    is near ``start + offset - 1``; of the lines with the removed text, the nearest one is it.
    """
    if start is None or offset is None:
        return None
    guess = start + offset - 1
    if removed is None:
        return guess
    matches = [i + 1 for i, text in enumerate(source) if text.strip() == removed]
    return min(matches, key=lambda line: abs(line - guess)) if matches else guess


def describe(work: Path, mutants: list[Mutant]) -> None:
    """Fill in the diff, source line and fingerprint of each mutant (mutmut's own diff of the function)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    trees: dict[str, tuple[ast.Module, list[str]]] = {}
    with inside(work):
        for mutant in mutants:
            path = f"{PACKAGE}/{mutant.module}"
            if path not in trees:
                text = Path(path).read_text()
                trees[path] = (ast.parse(text), text.splitlines())
            tree, source = trees[path]
            function, owner = orig_function_and_class_names_from_key(mutant.name)
            mutant.function = f"{owner}.{function}" if owner else function
            mutant.function_line = function_start(tree, mutant.function)
            diff = get_diff_for_mutant(mutant.name, path=path)
            mutant.diff = changed_lines(diff)
            mutant.fingerprint = hashlib.sha1("\n".join(mutant.diff).encode()).hexdigest()[:10]
            removed = next((line[1:] for line in mutant.diff if line.startswith("-")), None)
            mutant.line = source_line(source, mutant.function_line, first_changed_offset(diff), removed)


def read_equivalents(path: Path) -> list[Equivalent]:
    """The entries of mutation_equivalent.txt: ``NAME FINGERPRINT REASON`` per line, ``#`` comments."""
    entries = []
    if not path.exists():
        return entries
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=2)
        if len(parts) < 3:
            print(f"WARNING: {path.name}:{number}: needs NAME FINGERPRINT REASON, ignored: {line}")
            continue
        entries.append(Equivalent(*parts))
    return entries


def apply_equivalents(mutants: list[Mutant], entries: list[Equivalent]) -> list[str]:
    """Mark the surviving mutants that entries confirm as equivalent; return why the other entries are stale.

    Entries of modules that were not run (``--only``) are neither applied nor stale.
    """
    by_name = {m.name: m for m in mutants if m.status not in NOT_RUN}
    run_prefixes = {"dasgd." + m.module[: -len(".py")].replace("/", ".") + "." for m in by_name.values()}
    stale = []
    for entry in entries:
        mutant = by_name.get(entry.name)
        if mutant is None:
            if any(entry.name.startswith(prefix) for prefix in run_prefixes):
                stale.append(f"{entry.name}: no such mutant any more")
        elif mutant.status != "survived":
            stale.append(f"{entry.name}: now {mutant.status}, not survived")
        elif mutant.fingerprint != entry.fingerprint:
            stale.append(
                f"{entry.name}: fingerprint {entry.fingerprint} != {mutant.fingerprint} (code changed)"
            )
        else:
            mutant.equivalent = True
    return stale


def tabulate(mutants: list[Mutant]) -> list[ModuleRow]:
    """One row per module that had mutants run, then the total."""
    rows: dict[str, ModuleRow] = {}
    total = ModuleRow("total")
    for mutant in mutants:
        row = rows.setdefault(mutant.module, ModuleRow(mutant.module))
        for target in (row, total):
            target.counts[mutant.status] += 1
            target.equivalent += mutant.equivalent
    return [row for row in rows.values() if row.made] + [total]


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def print_table(rows: list[ModuleRow]) -> None:
    header = (
        f"{'module':<22}{'made':>6}{'killed':>8}{'survived':>10}{'no tests':>10}{'timeout':>9}{'other':>7}"
        f"{'kill rate':>11}{'equiv.':>8}{'excl. equiv.':>14}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.module == "total":
            print("-" * len(header))
        print(
            f"{row.module:<22}{row.made:>6}{row.killed:>8}{row.counts['survived']:>10}{row.counts[NO_TESTS]:>10}"
            f"{row.counts['timeout']:>9}{row.other:>7}{percent(row.rate(False)):>11}{row.equivalent:>8}"
            f"{percent(row.rate(True)):>14}"
        )
    print("kill rate = (killed + timeout) / made; excl. equiv. leaves the recorded equivalent survivors out;")
    print("no tests = no selected test calls the mutated function; other = runs mutmut found suspicious")


def print_survivors(survivors: list[Mutant], equivalent: int) -> None:
    """Each surviving mutant with its diff; below them, the functions no selected test calls."""
    listed = [m for m in survivors if m.status != NO_TESTS]
    print(
        f"\n== Mutants the tests did not kill ({len(listed)}; {equivalent} recorded equivalent ones not listed)"
    )
    print("   key for benchmarks/mutation_equivalent.txt: NAME FINGERPRINT REASON")
    for mutant in sorted(listed, key=lambda m: (m.module, m.line or 0, m.name)):
        status = "" if mutant.status == "survived" else f"  [{mutant.status}]"
        print(f"\n{PACKAGE}/{mutant.module}:{mutant.line}  {mutant.name} {mutant.fingerprint}{status}")
        for line in mutant.diff:
            print(f"    {line}")
    untested = Counter((m.module, m.function, m.function_line) for m in survivors if m.status == NO_TESTS)
    if untested:
        print(f"\n== Functions no selected test calls ({sum(untested.values())} mutants)")
        for (module, function, line), count in sorted(
            untested.items(), key=lambda item: (item[0][0], item[0][2] or 0)
        ):
            print(f"{PACKAGE}/{module}:{line}  {function}: {count} mutants")


def report(work: Path, equivalents_file: Path) -> tuple[list[ModuleRow], list[Mutant], list[str]]:
    """Read mutmut's verdicts in ``work``, print the table and the survivors; return them for the JSON."""
    mutants = read_verdicts(work)
    not_killed = [m for m in mutants if m.status not in KILLED | NOT_RUN | {"timeout"}]
    describe(work, not_killed)
    stale = apply_equivalents(mutants, read_equivalents(equivalents_file))
    rows = tabulate(mutants)
    survivors = [m for m in not_killed if not m.equivalent]
    print_survivors(survivors, sum(m.equivalent for m in mutants))
    if stale:
        print(f"\n== Stale entries of {equivalents_file.name} (they excuse nothing; update or remove them)")
        for why in stale:
            print(f"  {why}")
    print("\n== Mutation testing: kill rate per module")
    print_table(rows)
    return rows, survivors, stale


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = mutmut_problem()
    if problem is not None:
        print(f"{problem}. Install it first (this script installs nothing):\n    {PIP_COMMAND}")
        return 2
    facts = _common.machine_facts()
    _common.print_header(
        "mutation testing (mutmut) of core/, worker/, transport/queue.py", facts, _common.command_line()
    )
    load = _common.OtherLoad()
    with work_folder(args.keep) as work:
        print(f"work folder: {work}" + ("" if args.keep else " (removed at the end)"))
        copy_project(work)
        narrow_only_mutate(work / "pyproject.toml", args.only)
        code, phases, seconds = run_mutmut(work, args.jobs, args.progress)
        if code != 0:
            return 1
        rows, survivors, stale = report(work, EQUIVALENT_FILE)
    print(f"\nwall time: {seconds / 60:.1f} min, of which " + ", ".join(phase_durations(phases, seconds)))
    other_load = _common.report_other_load(load)
    _common.write_json(
        args.out,
        {
            "command": _common.command_line(),
            "machine": facts,
            "wall_s": round(seconds, 1),
            "phases_start_s": {k: round(v, 1) for k, v in phases.items()},
            "other_load": other_load,
            "modules": [row_json(row) for row in rows],
            "survivors": [survivor_json(m) for m in survivors],
            "stale_equivalents": stale,
        },
    )
    return fail_under(rows, args.fail_under)


def phase_durations(phases: dict[str, float], total: float) -> list[str]:
    """ "phase 12 s" for each phase of mutmut's run, in the order they ran."""
    starts = sorted(phases.items(), key=lambda item: item[1])
    ends = [start for _, start in starts[1:]] + [total]
    return [f"{name.lower()} {end - start:.0f} s" for (name, start), end in zip(starts, ends)]


def row_json(row: ModuleRow) -> dict[str, Any]:
    return {
        "module": row.module,
        "made": row.made,
        "killed": row.killed,
        "survived": row.counts["survived"],
        "timeout": row.counts["timeout"],
        "no_tests": row.counts[NO_TESTS],
        "other": row.other,
        "equivalent": row.equivalent,
        "kill_rate": row.rate(False),
        "kill_rate_excluding_equivalent": row.rate(True),
    }


def survivor_json(mutant: Mutant) -> dict[str, Any]:
    return {
        "module": mutant.module,
        "line": mutant.line,
        "name": mutant.name,
        "fingerprint": mutant.fingerprint,
        "status": mutant.status,
        "function": mutant.function,
        "diff": mutant.diff,
    }


def fail_under(rows: list[ModuleRow], threshold: float | None) -> int:
    """1 when a module's kill rate excluding equivalents is below ``threshold`` percent, else 0."""
    if threshold is None:
        return 0
    low = [row for row in rows[:-1] if (row.rate(True) or 0.0) * 100 < threshold]
    for row in low:
        print(f"FAIL: {row.module} kills {percent(row.rate(True))} (excl. equivalents) < {threshold}%")
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
