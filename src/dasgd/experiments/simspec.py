"""The simulation section of a spec: compute-time, network and failure models (validated at the edge).

In YAML it is the ``simulation:`` mapping of a run spec; on the command line, `dasgd simulate` flags of the
same names. Times are virtual seconds, bandwidth is bytes per second.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from dasgd.experiments.settings import setting

__all__ = ["SimSpec", "resolve_sim_spec", "parse_crash", "parse_link_down", "parse_link"]

COMPUTE_KINDS = ("constant", "lognormal", "trace")
LOSS_MODES = ("retransmit", "count")


def _error(key: str, message: str) -> Exception:
    from dasgd.experiments.settings import flag_of
    from dasgd.experiments.spec import SpecError, flag_name

    sim_fields = {f.name for f in dataclasses.fields(SimSpec)}
    return SpecError(flag_of(SimSpec, key) if key in sim_fields else flag_name(key), message)


def _number(text: str, key: str, whole: str, hint: str) -> float:
    """A finite float from the regex group ``text`` of ``whole``, or a SpecError."""
    try:
        out = float(text)
    except ValueError:
        out = math.nan
    if not math.isfinite(out):
        raise _error(key, f"{whole!r}: {text!r} is not a finite number; {hint}")
    return out


@dataclass(frozen=True)
class SimSpec:
    """How simulated workers compute and communicate."""

    compute: str = setting("constant", "compute-time model: constant | lognormal | trace")
    """constant | lognormal | trace."""
    compute_time: float = setting(0.01, "mean seconds per gradient", metavar="S")
    compute_sigma: float = setting(0.5, "lognormal: spread of log step time", metavar="X")
    trace: str | None = setting(None, "trace: a run's events.jsonl or one duration per line", metavar="FILE")
    """trace: a run's events.jsonl (per-worker step times) or a file of durations, one per line."""
    straggler_share: float = setting(0.0, "share of workers that are stragglers", metavar="F")
    """Share of workers that are stragglers (chosen by the seed), besides the spec's named stragglers."""
    slowdown: float = setting(1.0, "the stragglers' slowdown factor (>= 1)", metavar="F")
    latency: float = setting(0.001, "mean one-way message latency", metavar="S")
    latency_sigma: float = setting(0.0, "log-normal spread of the latency (0: constant)", metavar="X")
    bandwidth: float = setting(math.inf, "bytes per second per link (inf: unlimited)", metavar="BYTES_PER_S")
    links: tuple[tuple[int, int, float, float], ...] = setting((), cli=False)
    """Per-link overrides (src, dst, latency, bandwidth): spec files only."""
    loss: float = setting(0.0, "probability that one transmission is lost", metavar="P")
    loss_mode: str = setting("retransmit", "retransmit (delayed, nothing lost) | count (gone, counted)")
    retransmit_after: float = setting(0.01, "retransmission timeout", metavar="S")
    crashes: tuple[tuple[int, float], ...] = setting(
        (), "worker W crashes at T, e.g. 3@1.5 (repeatable)", flag="--crash", metavar="W@T", repeat=True
    )
    crash_rate: float = setting(0.0, "crashes per worker per second", metavar="R")
    link_down: tuple[tuple[int, int, float, float], ...] = setting(
        (), "link A-B down from S to E (repeatable)", metavar="A-B@S-E", repeat=True
    )
    """(a, b, start, end): link a-b down in [start, end)."""
    batched: bool = setting(True, "compute gradients one by one (same results)")
    """Compute many workers' gradients in one vectorised call (same results up to rounding)."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["bandwidth"] = None if math.isinf(self.bandwidth) else self.bandwidth
        out["links"] = [list(x) for x in self.links]
        out["crashes"] = [f"{w}@{t:g}" for w, t in self.crashes]
        out["link_down"] = [f"{a}-{b}@{s:g}-{e:g}" for a, b, s, e in self.link_down]
        return out


_CRASH = re.compile(r"^\s*(\d+)\s*@\s*([0-9.eE+-]+)\s*$")
_LINK_DOWN = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*@\s*([0-9.eE+-]+)\s*-\s*([0-9.eE+-]+)\s*$")


def parse_crash(text: Any) -> tuple[int, float]:
    """ "W@T": worker W crashes at virtual time T."""
    if isinstance(text, (list, tuple)) and len(text) == 2:
        text = f"{text[0]}@{text[1]}"
    m = _CRASH.match(str(text))
    if not m:
        raise _error("crash", f"{str(text)[:60]!r} is not WORKER@TIME; write e.g. 3@1.5")
    return int(m.group(1)), _number(m.group(2), "crash", str(text), "write e.g. 3@1.5")


def parse_link_down(text: Any) -> tuple[int, int, float, float]:
    """ "A-B@S-E": link A-B is down from S to E."""
    if isinstance(text, (list, tuple)) and len(text) == 4:
        text = f"{text[0]}-{text[1]}@{text[2]}-{text[3]}"
    m = _LINK_DOWN.match(str(text))
    if not m:
        raise _error("link_down", f"{str(text)[:60]!r} is not A-B@START-END; write e.g. 0-1@2-3.5")
    hint = "write e.g. 0-1@2-3.5"
    a, b = int(m.group(1)), int(m.group(2))
    s, e = (_number(m.group(i), "link_down", str(text), hint) for i in (3, 4))
    if not e > s >= 0:
        raise _error("link_down", f"{text!r}: need 0 <= START < END")
    return a, b, s, e


def parse_link(value: Any) -> tuple[int, int, float, float]:
    """A per-link override: [src, dst, latency, bandwidth] or "SRC-DST:LATENCY:BANDWIDTH"."""
    if isinstance(value, str):
        parts = re.split(r"[-:]", value.strip())
        value = parts
    try:
        src, dst, lat, bw = value
        out = (int(src), int(dst), float(lat), float(bw) if bw not in (None, "inf") else math.inf)
    except (TypeError, ValueError, OverflowError):
        raise _error(
            "links", f"{str(value)[:60]!r}: give SRC-DST:LATENCY:BANDWIDTH, e.g. 0-1:0.01:1e8"
        ) from None
    if not math.isfinite(out[2]) or out[2] < 0 or not out[3] > 0:
        raise _error("links", f"{value!r}: latency must be >= 0 and bandwidth > 0")
    return out


def _num(key: str, value: Any, kind=float, allow_inf: bool = False) -> Any:
    """``value`` as a number; NaN and (unless ``allow_inf``) infinity are refused."""
    try:
        if isinstance(value, bool):
            raise ValueError
        out = kind(value)
        if kind is float and (math.isnan(out) or (math.isinf(out) and not allow_inf)):
            raise ValueError
        return out
    except (TypeError, ValueError, OverflowError):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise _error(key, f"{shown} is not a valid {kind.__name__}") from None


def resolve_sim_spec(values: dict[str, Any] | None, workers: int) -> SimSpec:
    """Validate the simulation mapping for a run of ``workers`` workers."""
    from dasgd.experiments.spec import MAX_SLOWDOWN, SpecError

    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(SimSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        # Only a spec file's simulation mapping can hold an unknown key: name it as written there.
        raise SpecError(
            f"simulation.{unknown[0]}", f"unknown simulation key; known keys: {', '.join(sorted(known))}"
        )
    kw: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in ("compute", "loss_mode", "trace"):
            kw[key] = str(value)
        elif key == "batched":
            if not isinstance(value, bool):
                raise _error(key, "must be true or false")
            kw[key] = value
        elif key == "crashes":
            kw[key] = tuple(parse_crash(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        elif key == "link_down":
            kw[key] = tuple(
                parse_link_down(v) for v in (value if isinstance(value, (list, tuple)) else [value])
            )
        elif key == "links":
            if not isinstance(value, (list, tuple)):
                raise _error(key, "give a list of [SRC, DST, LATENCY, BANDWIDTH] entries")
            kw[key] = tuple(parse_link(v) for v in value)
        elif key == "bandwidth":
            # None is how spec.yaml writes "unlimited"; 0 is refused below (it is not "no limit").
            kw[key] = math.inf if value in ("inf", None) else _num(key, value, allow_inf=True)
        else:
            kw[key] = _num(key, value)
    spec = SimSpec(**kw)

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise _error(key, message)

    need(spec.compute in COMPUTE_KINDS, "compute", f"choose one of: {', '.join(COMPUTE_KINDS)}")
    need(spec.compute != "trace" or spec.trace is not None, "trace", "--compute trace needs --trace FILE")
    need(spec.compute_time > 0, "compute_time", "must be positive (seconds per gradient)")
    need(spec.compute_sigma >= 0, "compute_sigma", "must be non-negative")
    need(0 <= spec.straggler_share <= 1, "straggler_share", "must be a fraction in [0, 1]")
    need(
        1 <= spec.slowdown <= MAX_SLOWDOWN,
        "slowdown",
        f"must be >= 1 and at most {MAX_SLOWDOWN:g}, got {spec.slowdown:g}",
    )
    need(spec.latency >= 0, "latency", "must be non-negative (seconds)")
    need(spec.latency_sigma >= 0, "latency_sigma", "must be non-negative")
    need(spec.bandwidth > 0, "bandwidth", "must be positive (bytes per second), or inf")
    need(0 <= spec.loss < 1, "loss", "must be a probability in [0, 1)")
    need(spec.loss_mode in LOSS_MODES, "loss_mode", f"choose one of: {', '.join(LOSS_MODES)}")
    need(spec.retransmit_after > 0, "retransmit_after", "must be positive")
    need(spec.crash_rate >= 0, "crash_rate", "must be non-negative")
    for w, t in spec.crashes:
        need(
            0 <= w < workers and t >= 0,
            "crash",
            f"worker {w} at {t}: need a worker in 0..{workers - 1}, time >= 0",
        )
    for a, b, _, _ in spec.link_down:
        need(0 <= a < workers and 0 <= b < workers and a != b, "link_down", f"link {a}-{b}: no such link")
    for s, d, _, _ in spec.links:
        need(0 <= s < workers and 0 <= d < workers and s != d, "links", f"link {s}-{d}: no such link")
    return spec
