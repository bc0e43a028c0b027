"""Shared helpers of the benchmarks: machine facts, the exact command, JSON output, child processes.

Not part of the dasgd package. The benchmarks import it by name (``import _common``), which works because
Python puts a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

__all__ = [
    "ChildFailed",
    "command_line",
    "machine_facts",
    "median",
    "print_header",
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

    Each rank gets the environment torchrun would give it (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free
    MASTER_PORT), plus GLOO_SOCKET_IFNAME=lo and OMP_NUM_THREADS=1, and an extra ``--result FILE`` argument
    where it must write its JSON result. Returns the ranks' results in rank order.

    Raises:
        ChildFailed: a rank exited with an error, wrote no result, or ran past ``timeout`` seconds.
    """
    from dasgd.runtime.launcher import free_port

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dasgd-bench-") as tmp:
        folder = Path(tmp)
        procs: list[subprocess.Popen[bytes]] = []
        logs = []
        try:
            for rank in range(world_size):
                env = dict(
                    os.environ,
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(world_size),
                    LOCAL_WORLD_SIZE=str(world_size),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
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
