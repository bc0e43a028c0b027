"""Gradient throughput of dasgd's TorchDistTransport between two local processes, against a memory copy.

Two processes join a Gloo process group on loopback and build a :class:`TorchDistTransport` on it (with a
separate Gloo group for the benchmark's own barriers, as the runtime does). Rank 0 sends N
``Message(Kind.GRADIENT)`` of d float32 values with consecutive id ranges ``[i, i+1)``, then flushes; rank 1
polls until it holds every id. Two modes (see ``MODES``): burst sends as fast as ``send`` returns, paced waits
after each send until the message has left, so that every message crosses on its own. The payload is all ones, so a message that
holds ids ``[lo, hi)`` must have every element equal to ``hi - lo``: rank 1 checks that on the first and last
element of every message (an integrity check that survives coalescing).

Two throughputs, both over rank 1's time from the start barrier to holding all N ids:
- wire: payload bytes that crossed the link (messages the transport received x d x 4);
- gradient: gradient bytes delivered (N x d x 4). A slow receiver gets gradients coalesced (summed, with
  their id ranges), so this can exceed the wire rate; it is what training sees.
Baseline, in the same run on rank 0 (one thread, like the transport's processes): ``dst.copy_(src)`` of d
floats, N times. Each configuration runs ``--trials`` times in one process pair; medians are reported.

    python benchmarks/bench_transport.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common

__all__ = ["main", "run_pair", "transport_child"]

FULL = {100_000: 5000, 1_000_000: 500}
"""d (floats per gradient) -> N (messages per trial) of the full version (2 GB of gradients per trial)."""
QUICK = {100_000: 1000, 1_000_000: 100}
RECEIVE_TIMEOUT_S = 120.0
MODES = ("burst", "paced")
"""burst: send N as fast as send() returns (a busy link gets them coalesced); paced: wait after each send
until the transport handed it to the network, so every message crosses on its own (the link's own rate)."""


def transport_child(d: int, n: int, trials: int, result: str) -> None:
    """One rank of the pair (runs in its own process under the environment ``_common.run_ranks`` sets)."""
    from datetime import timedelta

    import numpy as np
    import torch
    import torch.distributed as dist

    from dasgd.core.message import Kind, Message
    from dasgd.transport.torchdist import TorchDistTransport

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    rank = dist.get_rank()
    # Barriers on their own group: collectives must never share a group with the transport's threads.
    control = dist.new_group(backend="gloo")
    transport = TorchDistTransport(rank, 2, d, torch.float32)
    payload = torch.ones(d, dtype=torch.float32)
    out: dict[str, Any] = {"rank": rank, "trials": []}
    base = 0
    for trial_no in range(trials * len(MODES)):
        mode = MODES[trial_no % len(MODES)]
        trial: dict[str, Any] = {"mode": mode}
        if rank == 0:
            src, dst = payload.clone(), torch.empty(d, dtype=torch.float32)
            dst.copy_(src)  # first touch of dst's pages is not part of the copy rate
            t0 = time.perf_counter()
            for _ in range(n):
                dst.copy_(src)
            trial["memcpy_s"] = time.perf_counter() - t0
        dist.barrier(group=control)
        if rank == 0:
            before = transport.stats().sent_messages
            t0 = time.perf_counter()
            for i in range(n):
                clock = np.array([base + i, 0], dtype=np.int64)
                transport.send(1, Message(Kind.GRADIENT, 0, 0, base + i, base + i + 1, payload, clock))
                if mode == "paced":
                    transport.flush(RECEIVE_TIMEOUT_S)
            trial["send_return_s"] = time.perf_counter() - t0
            trial["flushed"] = transport.flush(RECEIVE_TIMEOUT_S)
            trial["flush_s"] = time.perf_counter() - t0
            trial["sent_messages"] = transport.stats().sent_messages - before
        else:
            before = transport.stats().received_messages
            held = 0
            polled = 0
            intact = True
            highest = base
            t0 = time.perf_counter()
            deadline = t0 + RECEIVE_TIMEOUT_S
            while held < n and time.perf_counter() < deadline:
                transport.wait(0.05)
                for msg in transport.poll():
                    if msg.kind != Kind.GRADIENT or msg.payload is None:
                        continue
                    count = msg.hi - msg.lo
                    held += count
                    polled += 1
                    highest = max(highest, msg.hi)
                    intact = intact and float(msg.payload[0]) == count and float(msg.payload[-1]) == count
            trial["receive_s"] = time.perf_counter() - t0
            trial["ids_held"] = held
            trial["complete"] = held == n and highest == base + n
            trial["intact"] = intact
            trial["received_messages"] = transport.stats().received_messages - before
            trial["polled_messages"] = polled
        dist.barrier(group=control)
        base += n
        out["trials"].append(trial)
    out["transport_stats"] = transport.stats().to_dict()
    Path(result).write_text(json.dumps(out))
    dist.barrier(group=control)
    transport.shutdown()
    sys.stdout.flush()
    # As dasgd's own entry point does: tearing the process group down under a receiver thread can hang in
    # Gloo, and everything is written.
    os._exit(0)


def run_pair(d: int, n: int, trials: int) -> dict[str, Any]:
    """Run ``trials`` trials of each mode, N messages of d floats, in one fresh process pair."""
    sender, receiver = _common.run_ranks(
        __file__, [str(d), str(n), str(trials)], world_size=2, timeout=120 + 60 * trials
    )
    grad_bytes = n * d * 4
    rows = []
    for s, r in zip(sender["trials"], receiver["trials"]):
        wire_bytes = r["received_messages"] * d * 4
        rows.append(
            {
                "mode": s["mode"],
                "memcpy_MBps": grad_bytes / s["memcpy_s"] / 1e6,
                "wire_MBps": wire_bytes / r["receive_s"] / 1e6,
                "gradient_MBps": grad_bytes / r["receive_s"] / 1e6,
                "receive_s": r["receive_s"],
                "send_return_s": s["send_return_s"],
                "sent_messages": s["sent_messages"],
                "received_messages": r["received_messages"],
                "polled_messages": r["polled_messages"],
                "complete": r["complete"],
                "intact": r["intact"],
            }
        )
    memcpy = statistics.median(row["memcpy_MBps"] for row in rows)
    modes = {}
    for mode in MODES:
        mine = [row for row in rows if row["mode"] == mode]
        gradient = statistics.median(row["gradient_MBps"] for row in mine)
        wire = statistics.median(row["wire_MBps"] for row in mine)
        modes[mode] = {
            "gradient_MBps": gradient,
            "wire_MBps": wire,
            "messages_crossed": statistics.median(row["received_messages"] for row in mine),
            "ratio_gradient_over_memcpy": gradient / memcpy,
            "ratio_wire_over_memcpy": wire / memcpy,
        }
    return {
        "d": d,
        "n": n,
        "trials": trials,
        "message_bytes": d * 4,
        "memcpy_MBps": memcpy,
        "modes": modes,
        "all_complete_and_intact": all(row["complete"] and row["intact"] for row in rows),
        "per_trial": rows,
        "sender_stats": sender["transport_stats"],
        "receiver_stats": receiver["transport_stats"],
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short version (< 60 s)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--trials", type=int, help="trials per size (default 3; --quick: 1)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        d, n, trials = rest
        transport_child(int(d), int(n), int(trials), args.result)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    trials = args.trials or (1 if args.quick else 3)
    plan = QUICK if args.quick else FULL

    command = _common.command_line()
    facts = _common.machine_facts()
    _common.print_header(
        "bench_transport: TorchDistTransport gradient throughput vs memory copy", facts, command
    )
    meter = _common.OtherLoad()
    t_start = time.perf_counter()
    results = []
    for d, n in plan.items():
        print(f"d = {d:,} float32 ({d * 4 / 1e6:g} MB per gradient), N = {n} messages, {trials} trial(s)")
        sys.stdout.flush()
        r = run_pair(d, n, trials)
        for row in r["per_trial"]:
            print(
                f"  {row['mode']:<5}: gradient {row['gradient_MBps']:.0f} MB/s, wire {row['wire_MBps']:.0f} MB/s "
                f"({row['received_messages']} of {n} messages crossed), memcpy {row['memcpy_MBps']:.0f} MB/s, "
                f"complete {row['complete']}, intact {row['intact']}"
            )
        sys.stdout.flush()
        results.append(r)
    elapsed = time.perf_counter() - t_start

    print()
    print("medians (MB/s = 1e6 bytes/s)")
    print("d (floats)     N  mode   gradient MB/s  wire MB/s  memcpy MB/s  gradient/memcpy  wire/memcpy  ok")
    for r in results:
        for mode, m in r["modes"].items():
            print(
                f"{r['d']:>10,}  {r['n']:>4}  {mode:<5}  {m['gradient_MBps']:>13.0f}  {m['wire_MBps']:>9.0f}  "
                f"{r['memcpy_MBps']:>11.0f}  {m['ratio_gradient_over_memcpy']:>15.3f}  "
                f"{m['ratio_wire_over_memcpy']:>11.3f}  {r['all_complete_and_intact']}"
            )
    print(f"elapsed {elapsed:.1f} s")
    other_load = _common.report_other_load(meter)
    _common.write_json(
        args.out,
        {
            "benchmark": "transport",
            "command": command,
            "machine": facts,
            "quick": args.quick,
            "elapsed_s": elapsed,
            "cpu_used_by_others": other_load,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
