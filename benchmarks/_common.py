"""Shared helpers of the benchmarks: machine facts, the exact command, JSON output, child processes.

Not part of the dasgd package. The benchmarks import it by name (``import _common``), which works because
Python puts a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ChildFailed",
    "DDPConfig",
    "OtherLoad",
    "command_line",
    "cpu_busy",
    "ddp_rank",
    "parse_args_or_run_ddp_child",
    "first_hit",
    "machine_facts",
    "median",
    "print_header",
    "report_other_load",
    "run_ranks",
    "write_json",
]


class ChildFailed(RuntimeError):
    """A benchmark child process exited with an error; the message holds the end of its log."""


def command_line() -> str:
    """The command that started this benchmark, as a shell would take it (interpreter first)."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all cores' time spent busy over the next ``seconds`` (Linux; None elsewhere).

    Measured before a benchmark starts, it shows whether other work shares the machine (this benchmark's
    numbers then mean little).
    """

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    spent = total1 - total0
    return round(1.0 - (idle1 - idle0) / spent, 3) if spent > 0 else None


class OtherLoad:
    """How much of the machine's CPU other processes used while this benchmark ran (Linux).

    Machine-wide busy time from /proc/stat, less the CPU time of this process and of its waited-for children
    (every worker and baseline process the benchmarks start). Create it at the start, call
    :meth:`fraction` at the end.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import resource

        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        busy = (sum(fields) - fields[3] - fields[4]) / hz  # all but idle and iowait
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            own += usage.ru_utime + usage.ru_stime
        return time.monotonic(), busy, own

    def fraction(self) -> float | None:
        """Share of all cores' time used by other processes since construction (None if unknown)."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        cores = os.cpu_count() or 1
        return round(max(0.0, others) / (wall * cores), 3) if wall > 0 else None


def report_other_load(meter: OtherLoad) -> float | None:
    """Print (and return) the share of the machine other processes used during the run; warn above 10%."""
    share = meter.fraction()
    if share is not None:
        print(f"CPU used by other processes during the run: {share:.0%} of all cores")
        if share > 0.10:
            print("WARNING: other work ran during this benchmark; rerun it on an idle machine")
    return share


def machine_facts() -> dict[str, Any]:
    """Cores, CPU model, load, and the versions a reader needs to compare numbers across machines."""
    import torch

    import dasgd

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dasgd": dasgd.__version__,
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "cpu_busy_before_start": cpu_busy(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def print_header(title: str, facts: dict[str, Any], command: str) -> None:
    """Print the benchmark's name, its exact command and the machine facts."""
    print(f"== {title}")
    print(f"command: {command}")
    print(
        f"machine: {facts['cores']} cores ({facts['cpu']}), torch {facts['torch']}, python {facts['python']}, "
        f"dasgd {facts['dasgd']}, load avg {facts['loadavg_1_5_15']}"
    )
    busy = facts.get("cpu_busy_before_start")
    if busy is not None:
        print(f"CPU busy before the start: {busy:.0%} of all cores")
        if busy > 0.15:
            print("WARNING: other work is running on this machine; the numbers below will be noisy")
    sys.stdout.flush()


def write_json(path: str | None, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` (nothing when ``path`` is None)."""
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"results written to {out}")


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_ranks(script: str, args: Sequence[str], world_size: int, timeout: float) -> list[dict[str, Any]]:
    """Run ``python script --child ARGS`` as ``world_size`` torch.distributed ranks on loopback.

    Each rank gets the environment torchrun would give it (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and the
    MASTER_PORT of a c10d store this process hosts for the ranks' whole life, joined as its clients like
    torchrun's agent store), plus GLOO_SOCKET_IFNAME=lo and OMP_NUM_THREADS=1, and an extra ``--result FILE``
    argument where it must write its JSON result. Returns the ranks' results in rank order.

    Raises:
        ChildFailed: a rank exited with an error, wrote no result, or ran past ``timeout`` seconds.
    """
    from dasgd.runs.launcher import host_store, store_env

    store = host_store()  # held until the ranks are done: no port is picked free and bound later
    with tempfile.TemporaryDirectory(prefix="dasgd-bench-") as tmp:
        folder = Path(tmp)
        procs: list[subprocess.Popen[bytes]] = []
        logs = []
        try:
            for rank in range(world_size):
                env = dict(
                    os.environ,
                    **store_env(store),
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(world_size),
                    LOCAL_WORLD_SIZE=str(world_size),
                    GLOO_SOCKET_IFNAME="lo",
                    OMP_NUM_THREADS="1",
                )
                log = open(folder / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed in finally
                logs.append(log)
                cmd = [sys.executable, script, "--child", *args, "--result", str(folder / f"rank{rank}.json")]
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout
            for rank, proc in enumerate(procs):
                try:
                    code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise ChildFailed(
                        f"rank {rank} ran past {timeout:.0f} s; end of its log:\n{_tail(folder / f'rank{rank}.log')}"
                    ) from None
                if code != 0:
                    raise ChildFailed(
                        f"rank {rank} exited with {code}; end of its log:\n{_tail(folder / f'rank{rank}.log')}"
                    )
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for log in logs:
                log.close()
        results = []
        for rank in range(world_size):
            path = folder / f"rank{rank}.json"
            if not path.exists():
                raise ChildFailed(
                    f"rank {rank} wrote no result; end of its log:\n{_tail(folder / f'rank{rank}.log')}"
                )
            results.append(json.loads(path.read_text()))
        return results


def first_hit(evals: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation (in the order given) whose test accuracy is at least ``target``, or None."""
    for row in evals:
        if row["test_accuracy"] >= target:
            return row
    return None


@dataclass(frozen=True)
class DDPConfig:
    """What one PyTorch DDP baseline run does (every rank gets the same config).

    The model, per-rank mini-batch streams and stepsize are dasgd's for the same task and seed:
    ``task.build_model(seed)``, ``task.sampler(sampler_seed(RunSpec(seed=seed), rank), batch_size)`` and
    ``lr`` (DDP averages the ranks' gradients, like dasgd's mini-batch SGD baseline).
    """

    task: str
    slowdown: float
    """How much slower rank ``slow_rank`` is (1.0: no straggler)."""
    slow_rank: int
    eval_every: float
    """Seconds between rank 0's evaluations (counted from the end of the previous one)."""
    target: float
    """Test accuracy at which every rank stops."""
    max_seconds: float
    batch_size: int
    lr: float
    seed: int = 0
    stop_check_every: int = 10
    """Iterations between the ranks' stop agreements (a one-element all-reduce, outside the measured time)."""

    def to_args(self) -> list[str]:
        """The config as command-line words (``ddp_rank`` children get it as one JSON argument)."""
        return [json.dumps(asdict(self))]

    @classmethod
    def from_args(cls, words: Sequence[str]) -> DDPConfig:
        """The inverse of :meth:`to_args`."""
        return cls(**json.loads(words[0]))


def parse_args_or_run_ddp_child(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace | None:
    """Parse a benchmark's command line; in a DDP rank started by :func:`run_ranks` with a
    :class:`DDPConfig`, run that rank instead and return None. Unknown arguments are a usage error."""
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        ddp_rank(DDPConfig.from_args(rest), args.result)
        return None
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def ddp_rank(config: DDPConfig, result: str) -> None:
    """One DDP rank: train until rank 0 sees the target (or ``max_seconds``), write the JSON result, exit.

    Runs in its own process under the environment :func:`run_ranks` sets. Each iteration does what dasgd's
    loop does, in its order: apply what arrived (the averaged gradient of the previous all-reduce,
    ``optimizer.step()``), evaluate if due (rank 0, ``task.evaluate(model, full=False)``), compute the next
    gradient. The slow rank emulates its straggler as dasgd does (``LoopConfig.slowdown``): once the backward
    pass filled the gradient bucket it waits (slowdown - 1) x the time the iteration took so far, inside a
    DDP communication hook, before the all-reduce (the benchmarked models fit in one bucket). The result holds
    rank 0's evaluations (``time``, ``gradients`` = ranks x steps applied, metrics), steps, and mean compute
    and step times. The process leaves with ``os._exit(0)`` (see the end of the function).
    """
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from dasgd.experiments.spec import RunSpec
    from dasgd.runs.build import sampler_seed
    from dasgd.tasks import make_task

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    world = dist.get_world_size()
    factor = config.slowdown if rank == config.slow_rank else 1.0
    task = make_task(config.task)
    model = task.build_model(config.seed)
    ddp = DistributedDataParallel(model)
    sampler = task.sampler(sampler_seed(RunSpec(seed=config.seed), rank), config.batch_size)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=config.lr)

    step_start = [0.0]
    compute: list[float] = []

    # No annotations here on purpose: DDP checks the hook's annotations against the real classes, and
    # `from __future__ import annotations` would turn them into strings that fail that check.
    def straggle_then_allreduce(state, bucket):  # type: ignore[no-untyped-def]
        # Called once the backward pass has filled the (single) gradient bucket: the local work is done.
        elapsed = time.time() - step_start[0]
        compute.append(elapsed)
        if factor > 1.0:
            time.sleep((factor - 1.0) * elapsed)
        return allreduce_hook(None, bucket)  # type: ignore[arg-type]

    ddp.register_comm_hook(None, straggle_then_allreduce)
    dist.barrier()
    origin = time.time()
    evals: list[dict[str, float]] = []
    next_eval = 0.0
    steps = 0
    reached = False
    step_times: list[float] = []
    eval_s: list[float] = []
    iterations = 0
    pending = False
    # The stop agreement comes first in the iteration so that its wait is not counted in the step time.
    while True:
        if iterations % config.stop_check_every == 0:
            stop = reached or time.time() - origin >= config.max_seconds
            flag = torch.tensor([1.0 if stop else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                break
        t_iter = time.time()
        step_start[0] = t_iter
        if pending:
            optimizer.step()
            steps += 1
        now = time.time() - origin
        if rank == 0 and now >= next_eval:
            metrics = task.evaluate(model, full=False)
            eval_s.append(time.time() - origin - now)
            evals.append({"time": now, "gradients": float(world * steps), **metrics})
            reached = reached or metrics["test_accuracy"] >= config.target
            next_eval = time.time() - origin + config.eval_every
        optimizer.zero_grad(set_to_none=True)
        task.loss(ddp, sampler.next()).backward()
        pending = True
        iterations += 1
        step_times.append(time.time() - t_iter)
    out = {
        "rank": rank,
        "slowdown": factor,
        "steps": steps,
        "mean_compute_s": float(np.mean(compute)) if compute else 0.0,
        "mean_step_s": float(np.mean(step_times)) if step_times else 0.0,
        "evals": evals,
        "eval_s": eval_s,
    }
    Path(result).write_text(json.dumps(out))
    dist.barrier()  # nobody leaves while another rank still uses the connections
    sys.stdout.flush()
    # Tearing the group down (destroy_process_group) after DDP with a communication hook sometimes aborts
    # the process in Gloo ("terminate called without an active exception"); everything is written, so leave.
    os._exit(0)
