"""The run spec: typed, frozen, validated once at the edge.

A spec comes from a YAML file, CLI flags, or Python keyword arguments; all three go through
:func:`resolve_spec`, which rejects bad values with a :class:`SpecError` that names the flag the user typed
and how to fix it. Below this module nothing re-validates: constructors take the few plain values they need.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from dasgd.core.message import MAX_GRADIENTS_PER_MESSAGE
from dasgd.errors import DasgdError
from dasgd.experiments.settings import flag_of, kind_of, setting
from dasgd.experiments.simspec import SimSpec, resolve_sim_spec

__all__ = ["RunSpec", "SpecError", "load_spec_file", "resolve_spec", "parse_straggler", "flag_name"]

DATA_MODES = ("shared", "shards")
DEVICES = ("cpu", "cuda")


class SpecError(DasgdError, ValueError):
    """A spec value is invalid. ``flag`` is the CLI flag (or YAML key) at fault."""

    def __init__(self, flag: str, message: str) -> None:
        # One line, whatever the user typed: a key or path with a line break or a control character in it is
        # shown escaped, as repr() would.
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in f"{flag}: {message}")
        super().__init__(text)
        self.flag = flag


MAX_SLOWDOWN = 1e6
"""The largest straggler factor: beyond it a worker's waits overflow a sleep, and it computes nothing anyway."""
MAX_BATCH_SIZE = 100_000
"""The largest mini-batch: one batch is held in memory at once (100,000 MNIST images are 300 MB)."""
MAX_DIM = 10_000_000
"""The quadratic's largest dimension: every replica holds ``dim`` float64 values (80 MB at the bound)."""
MAX_NOISE_VALUES = 100_000_000
"""The quadratic draws a (batch size x dim) float64 noise matrix per gradient: at most this many (800 MB)."""


def flag_name(key: str) -> str:
    """The CLI flag for a spec field: ``max_gradients`` -> ``--max-gradients``; a run setting whose flag
    differs from its name (``stragglers`` -> ``--straggler``) gets the flag a user types."""
    if key in _RUN_FIELDS:
        return flag_of(RunSpec, key)
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run. Same spec and seed: same data order, same initial model."""

    task: str = setting("mnist-logreg", "quadratic | digits-logreg | mnist-logreg | fashion-cnn")
    """Workload: quadratic, digits-logreg, mnist-logreg, fashion-cnn."""
    workers: int = setting(4, "number of workers (one replica each)")
    algorithm: str = setting(
        "dasgd", "dasgd | sync | ps-asgd | local-sgd | gossip | dasgd-cap | dasgd-damped (docs/algorithms.md)"
    )
    """dasgd | sync | ps-asgd | local-sgd | gossip | dasgd-cap | dasgd-damped (dasgd.algorithms)."""
    topology: str = setting("complete", "complete | ring | torus | torus:RxC | random-regular:D | edges:PATH")
    lr: float | None = setting(None, "fixed stepsize (default: the task's; the quadratic's is 0.5 / workers)")
    """Fixed stepsize eta; None takes the task's default."""
    batch_size: int | None = setting(None, "mini-batch size per gradient (default: the task's)")
    """Mini-batch size of one gradient; None takes the task's default."""
    seed: int = setting(0, "run seed: same spec and seed, same data order and initial model")
    data: str = setting("shared", "shared (homogeneous) | shards (disjoint, outside the theory)")
    """shared: every worker samples the whole training set (homogeneous, the theory's setting);
    shards: disjoint shards (heterogeneous, outside the theory)."""
    max_gradients: int | None = setting(None, "stop after T gradients in total", metavar="T")
    """Stop once the replicas hold this many gradients in total (T of the paper)."""
    max_seconds: float | None = setting(None, "stop after this many seconds of training", metavar="S")
    target_accuracy: float | None = setting(None, "stop once worker 0's replica reaches it, e.g. 0.9")
    eval_every: float | None = setting(
        None, "seconds between evaluations (default: 0.5 s real, 5 mean step times simulated)", metavar="S"
    )
    """Seconds between evaluations of worker 0's replica; None: 0.5 s in real runs, and in a simulation
    five mean step times of virtual time (a simulated run lasts only a few virtual seconds)."""

    def evaluation_interval(self, simulated: bool) -> float:
        """``eval_every``, or its default for a real or a simulated run."""
        if self.eval_every is not None:
            return self.eval_every
        return 5.0 * self.simulation.compute_time if simulated else 0.5

    stragglers: tuple[tuple[int, float], ...] = setting(
        (),
        "make a worker slower, e.g. 1x5 (repeatable)",
        flag="--straggler",
        metavar="RANKxFACTOR",
        repeat=True,
    )
    """(rank, slowdown) pairs: that worker's steps take `slowdown` times as long (emulated by waiting)."""
    grads_per_message: int = setting(1, "own gradients summed per message, B (TensAIR's option)", metavar="B")
    local_steps: int = setting(8, "local-sgd: local steps H between model averages", metavar="H")
    staleness_bound: int | None = setting(
        None,
        "dasgd-cap: largest staleness applied in full; dasgd-damped: staleness that halves the step "
        "(default: twice the workers)",
        metavar="S",
    )
    cap_scale: float = setting(0.0, "dasgd-cap: factor for staler gradients (0 drops them)")
    dim: int = setting(100, "quadratic: dimension")
    noise: float = setting(1.0, "quadratic: gradient noise sigma (E||xi||^2 = sigma^2 at batch size 1)")
    condition: float = setting(10.0, "quadratic: condition number L/mu")
    device: str = setting("cpu", "cpu (Gloo) | cuda (one GPU per worker, NCCL payloads)")
    """cpu: replicas on the CPU, everything over Gloo. cuda: one GPU per worker (by local rank); message
    headers over Gloo, gradient payloads over NCCL (the split-plane transport). Not tested without a GPU."""
    secret_env: str | None = setting(
        None, "env variable holding a shared secret (HMAC-signed messages)", metavar="VAR"
    )
    drain_timeout: float = setting(120.0, "seconds allowed for the end-of-run drain")
    startup_timeout: float = setting(300.0, "seconds every worker may take to join and load its data")
    """Real runs: how long workers wait for each other at each start-up stage; a worker that did not arrive
    in time is named in the error (it died or never started)."""
    checkpoint_every: float = setting(
        300.0, "real runs: seconds between checkpoints in RUN_DIR/checkpoints (0: none)", metavar="S"
    )
    """Real runs: every S seconds the lowest live worker starts a consistent cut (docs/design.md, "Checkpoints");
    every worker writes its part from a background thread while it trains, the launcher writes the manifest once
    all parts are there, and the last 2 complete checkpoints are kept. 0 takes none. The default (5 minutes)
    bounds the work a crash loses while a checkpoint of a small model costs well under a second of writing."""
    audit: bool = setting(
        False, "write each replica's audit trail to RUN_DIR/audit/ for an independent check (small runs)"
    )
    """Write each replica's audit trail to RUN_DIR/audit/ (x0, every computed gradient in float64, what each
    replica applied, its final parameters), so that an independent checker can recompute every replica.
    Costs 8 bytes per parameter per gradient on disk: meant for tests and audits of small runs."""
    diverge_factor: float = setting(
        10.0,
        "stop the run as diverged (exit code 3) once the evaluated loss exceeds this many times its first "
        "evaluation; 0: only a NaN/inf loss or gradient (docs/stepsize.md)",
        metavar="K",
    )
    """The exploding rule (worker/rules.py): the evaluated replica's loss above K times its first evaluation,
    or a NaN/inf loss or gradient at any K, stops every worker with reason "diverged"; the CLI exits 3."""
    theory: bool = setting(
        True, "estimate the bounds' constants for report.md at the end (`dasgd theory RUN_DIR` does it later)"
    )
    """Whether the end of a run estimates L, sigma^2, Q, F0 for report.md's theory section (costly on a CNN:
    Hessian power iterations); ``--no-theory`` skips it, and ``dasgd theory RUN_DIR`` or ``dasgd report``
    computes it later."""
    plots: bool = setting(True, "draw plots/*.png at the end (`dasgd report RUN_DIR` draws them later)")
    """Whether the end of a run draws ``plots/*.png``; ``--no-plots`` skips it, ``dasgd report`` draws them."""
    tensorboard: bool = setting(
        False, "also write TensorBoard scalars to RUN_DIR/tensorboard (pip install 'dasgd[tensorboard]')"
    )
    """Write TensorBoard event files (loss, accuracy, staleness, throughput per worker) built from the run's
    records into ``RUN_DIR/tensorboard`` (dasgd.metrics.tensorboard); needs the ``tensorboard`` extra."""
    run_dir: str | None = setting(None, "output directory (default runs/<task>-<time>)")
    simulation: SimSpec = setting(default_factory=SimSpec, cli=False)
    """How `dasgd simulate` models compute, network and failures (ignored by real runs)."""
    notes: dict[str, Any] = setting(default_factory=dict, cli=False, compare=False)
    """Free-form labels copied into the summary (not validated)."""

    def slowdown(self, rank: int) -> float:
        """The slowdown factor of worker ``rank`` (1.0 when it is not a straggler)."""
        return dict(self.stragglers).get(rank, 1.0)

    def stop_rules(self) -> dict[str, float]:
        """The stop rules in force."""
        rules = {
            "max_gradients": self.max_gradients,
            "max_seconds": self.max_seconds,
            "target_accuracy": self.target_accuracy,
        }
        return {k: v for k, v in rules.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML/JSON (stragglers as "RANKxFACTOR" strings)."""
        out = dataclasses.asdict(self)
        out["stragglers"] = [f"{r}x{f:g}" for r, f in self.stragglers]
        out["simulation"] = self.simulation.to_dict()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_STRAGGLER = re.compile(r"^\s*(\d+)\s*[xX:]\s*([0-9.eE+-]+)\s*$")


_RUN_FIELDS = frozenset(f.name for f in fields(RunSpec))


def parse_straggler(text: str) -> tuple[int, float]:
    """Parse "RANKxFACTOR" (e.g. "1x5": worker 1 five times slower)."""
    m = _STRAGGLER.match(str(text))
    if not m:
        raise SpecError(
            "--straggler", f"{text!r} is not RANKxFACTOR; write e.g. 1x5 for worker 1 five times slower"
        )
    try:
        factor = float(m.group(2))
    except ValueError:
        raise SpecError("--straggler", f"{text!r}: the factor {m.group(2)!r} is not a number") from None
    return int(m.group(1)), factor


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as an input file ("does not exist", "is a directory", ...), or None."""
    p = Path(path)
    if p.is_dir():
        return "is a directory, not a file"
    if p.exists() and not p.is_file():
        return "is not a regular file (a device, pipe or socket)"
    if not p.exists():
        return "does not exist"
    return None


def read_text_file(path: str | Path, flag: str, what: str) -> str:
    """The UTF-8 text of the input file ``path``; a SpecError naming ``flag`` says why it cannot be read.

    ``what`` says what the file should be, for the message (e.g. "the path of a YAML file").
    """
    p = Path(path)
    problem = file_problem(p)
    if problem is not None:
        raise SpecError(flag, f"{str(p)!r} {problem}; give {what}")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(flag, f"{str(p)!r} is not UTF-8 text (a binary file?); give {what}") from None
    except OSError as exc:
        raise SpecError(flag, f"cannot read {str(p)!r}: {(exc.strerror or str(exc)).lower()}") from None


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML spec file into plain values (validated later by resolve_spec)."""
    p = Path(path)
    if file_problem(p) == "does not exist":
        raise SpecError("SPEC", f"spec file {str(p)!r} does not exist; pass the path of a YAML file")
    text = read_text_file(p, "SPEC", "the path of a YAML spec file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError("SPEC", f"{p} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise SpecError("SPEC", f"{p} is nested too deeply to be a spec file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError("SPEC", f"{p} must hold a mapping of spec keys, got {type(data).__name__}")
    return data


def _coerce(name: str, value: Any, kind: str) -> Any:
    flag = flag_name(name)
    if value is None:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise SpecError(
                flag, f"{value!r} is not a valid bool: give true or false (YAML), or the bare flag"
            )
        return value
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if kind == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise SpecError(flag, f"{_short(value)} is not a valid {kind}") from None
    raise AssertionError(kind)


def _short(value: Any) -> str:
    """``repr(value)``, cut to fit in a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(value: Any, flag: str, what: str) -> dict[str, Any]:
    """``value`` as a dict with string keys, or a SpecError naming ``flag``."""
    if not isinstance(value, dict):
        raise SpecError(flag, f"must be a mapping of {what}, got {type(value).__name__} {_short(value)}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise SpecError(flag, f"the key {_short(bad[0])} is not a name; give {what} by name")
    return dict(value)


def resolve_spec(
    values: dict[str, Any] | None = None, *, simulate: bool = False, **overrides: Any
) -> RunSpec:
    """Build and validate a RunSpec from file values updated by overrides (None overrides are ignored).

    Unknown keys, wrong types and out-of-range values raise SpecError naming the flag and the fix.
    ``simulate`` allows the worker counts only the simulator can run. Simulation keys may be given in
    ``values["simulation"]`` and overridden by ``overrides["simulation"]`` (a mapping).
    """
    from dasgd.algorithms import ALGORITHMS
    from dasgd.tasks import TASK_NAMES, task_entry

    merged = _mapping({} if values is None else values, "SPEC", "spec keys")
    sim_given = merged.pop("simulation", None)
    sim_values = _mapping({} if sim_given is None else sim_given, "simulation", "simulation keys")
    sim_overrides = overrides.pop("simulation", None)
    sim_overrides = _mapping({} if sim_overrides is None else sim_overrides, "simulation", "simulation keys")
    sim_values.update({k: v for k, v in sim_overrides.items() if v is not None})
    # A null value in a spec file means "not given" (the default), as an omitted flag does.
    merged = {k: v for k, v in merged.items() if v is not None}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(RunSpec)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise SpecError(flag_name(unknown[0]), f"unknown spec key; known keys: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    for name, value in merged.items():
        if name == "stragglers":
            kw[name] = _stragglers(value)
        elif name == "notes":
            if not isinstance(value, dict):
                raise SpecError("notes", "must be a mapping")
            kw[name] = dict(value)
        else:
            kw[name] = _coerce(name, value, kind_of(RunSpec, name))
    kw["simulation"] = resolve_sim_spec(sim_values, int(kw.get("workers", RunSpec.workers)))
    spec = RunSpec(**kw)
    _check(spec, TASK_NAMES, tuple(ALGORITHMS), simulate)
    if not spec.stop_rules():
        # A few epochs: the task's default budget (total gradients over all workers).
        spec = dataclasses.replace(spec, max_gradients=task_entry(spec.task).default_budget)
    return spec


def _stragglers(value: Any) -> tuple[tuple[int, float], ...]:
    items: list[tuple[int, float]] = []
    if isinstance(value, dict):
        for r, f in value.items():
            items.append(parse_straggler(f"{r}x{f}"))
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, (list, tuple)) and len(v) != 2:
                raise SpecError(
                    "--straggler", f"{_short(v)}: give [RANK, FACTOR] pairs or RANKxFACTOR strings"
                )
            items.append(
                parse_straggler(v) if not isinstance(v, (list, tuple)) else parse_straggler(f"{v[0]}x{v[1]}")
            )
    elif isinstance(value, str):
        items.extend(parse_straggler(v) for v in value.split(",") if v.strip())
    else:
        raise SpecError("--straggler", f"{_short(value)}: give RANKxFACTOR strings, e.g. ['1x5']")
    ranks = [r for r, _ in items]
    if len(set(ranks)) != len(ranks):
        raise SpecError("--straggler", "a worker is named twice; give each straggler once")
    return tuple(sorted(items))


def _check(spec: RunSpec, task_names: tuple[str, ...], algorithms: tuple[str, ...], simulate: bool) -> None:
    from dasgd.tasks import task_entry

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise SpecError(flag_name(key), message)

    need(
        spec.task in task_names, "task", f"unknown task {spec.task!r}; choose one of: {', '.join(task_names)}"
    )
    need(
        spec.algorithm in algorithms,
        "algorithm",
        f"unknown algorithm {spec.algorithm!r}; choose one of: {', '.join(algorithms)}",
    )
    limit = 100_000 if simulate else 1024
    need(
        1 <= spec.workers <= limit,
        "workers",
        f"{spec.workers} workers: give 1 to {limit}"
        + ("" if simulate else " real workers (`dasgd simulate` runs more)"),
    )
    need(spec.lr is None or spec.lr > 0, "lr", f"the stepsize must be positive, got {spec.lr}")
    need(spec.batch_size is None or spec.batch_size >= 1, "batch_size", "the batch size must be at least 1")
    need(
        spec.batch_size is None or spec.batch_size <= MAX_BATCH_SIZE,
        "batch_size",
        f"{spec.batch_size}: give at most {MAX_BATCH_SIZE} (a whole batch is held in memory at once)",
    )
    need(spec.seed >= 0, "seed", "the seed must be a non-negative integer")
    need(spec.data in DATA_MODES, "data", f"choose one of: {', '.join(DATA_MODES)}")
    need(spec.max_gradients is None or spec.max_gradients >= 1, "max_gradients", "must be at least 1")
    need(spec.max_seconds is None or spec.max_seconds > 0, "max_seconds", "must be positive (seconds)")
    need(
        spec.target_accuracy is None or 0 < spec.target_accuracy <= 1,
        "target_accuracy",
        "must be a fraction in (0, 1], e.g. 0.9",
    )
    need(
        spec.target_accuracy is None or task_entry(spec.task).has_accuracy,
        "target_accuracy",
        f"the {spec.task} task has no accuracy; stop it with --max-gradients or --max-seconds",
    )
    need(spec.eval_every is None or spec.eval_every > 0, "eval_every", "must be positive (seconds)")
    if simulate and spec.eval_every is not None:
        # Evaluations are events in virtual time: too many per step and a short run never ends.
        least = spec.simulation.compute_time / 1000
        need(
            spec.eval_every >= least,
            "eval_every",
            f"{spec.eval_every:g} s: a simulation evaluates at most 1000 times per mean step time "
            f"(--compute-time {spec.simulation.compute_time:g}); give at least {least:g}",
        )
    need(spec.grads_per_message >= 1, "grads_per_message", "must be at least 1 (1 is the theory's setting)")
    need(
        spec.grads_per_message <= MAX_GRADIENTS_PER_MESSAGE,
        "grads_per_message",
        f"must be at most {MAX_GRADIENTS_PER_MESSAGE} (the most gradients one message may sum)",
    )
    need(spec.local_steps >= 1, "local_steps", "must be at least 1 (local steps between averages)")
    need(
        spec.staleness_bound is None or spec.staleness_bound >= 1,
        "staleness_bound",
        "must be at least 1 (gradients)",
    )
    need(0 <= spec.cap_scale <= 1, "cap_scale", "must be in [0, 1] (0 drops gradients staler than the bound)")
    need(spec.dim >= 1, "dim", "must be at least 1")
    need(
        spec.dim <= MAX_DIM,
        "dim",
        f"{spec.dim}: give at most {MAX_DIM} (every replica holds dim float64 values: 80 MB at the bound)",
    )
    if spec.task == "quadratic":
        batch = spec.batch_size if spec.batch_size is not None else task_entry(spec.task).default_batch_size
        need(
            batch * spec.dim <= MAX_NOISE_VALUES,
            "dim",
            f"batch size {batch} x dim {spec.dim} = {batch * spec.dim:.3g} noise values per gradient "
            f"({batch * spec.dim * 8 / 1e9:.3g} GB): keep the product at most {MAX_NOISE_VALUES:.0e} "
            "with a smaller --dim or --batch-size",
        )
    need(spec.noise >= 0, "noise", "must be non-negative")
    need(spec.condition >= 1, "condition", "must be at least 1 (L/mu)")
    need(spec.device in DEVICES, "device", f"choose one of: {', '.join(DEVICES)}")
    if spec.device == "cuda":
        import torch

        need(
            torch.cuda.is_available(),
            "device",
            "no CUDA device is visible to torch here; use --device cpu, or install a CUDA build of torch",
        )
    need(spec.drain_timeout > 0, "drain_timeout", "must be positive (seconds)")
    need(
        math.isfinite(spec.checkpoint_every) and spec.checkpoint_every >= 0,
        "checkpoint_every",
        "must be a number of seconds >= 0 (0: no checkpoints)",
    )
    if spec.tensorboard:
        import importlib.util

        need(
            importlib.util.find_spec("tensorboard") is not None,
            "tensorboard",
            "the tensorboard package is not installed: pip install 'dasgd[tensorboard]' "
            "(or pip install tensorboard), or leave --tensorboard out",
        )
    need(
        spec.diverge_factor == 0 or spec.diverge_factor > 1,
        "diverge_factor",
        f"{spec.diverge_factor:g}: give a factor above 1 (e.g. 10), or 0 to stop only on NaN/inf",
    )
    need(
        math.isfinite(spec.startup_timeout) and spec.startup_timeout > 0,
        "startup_timeout",
        "must be a positive number of seconds",
    )
    for rank, factor in spec.stragglers:
        need(
            0 <= rank < spec.workers,
            "stragglers",
            f"worker {rank} does not exist in a run of {spec.workers} workers (ranks 0..{spec.workers - 1})",
        )
        need(
            math.isfinite(factor) and 1 <= factor <= MAX_SLOWDOWN,
            "stragglers",
            f"slowdown {factor:g} for worker {rank}: give a factor from 1 to {MAX_SLOWDOWN:g}",
        )
    if spec.secret_env is not None:
        need(
            bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", spec.secret_env)),
            "secret_env",
            "give the NAME of an environment variable that holds the secret, not the secret itself",
        )
