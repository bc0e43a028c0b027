"""Gradient throughput of dasgd's TorchDistTransport between two local processes: this tree against a baseline.

Two processes join a Gloo process group on loopback and build a :class:`TorchDistTransport` on it (with a
separate Gloo group for the benchmark's own barriers, as the runtime does). Rank 0 sends N
``Message(Kind.GRADIENT)`` of d float32 values with consecutive id ranges ``[i, i+1)``, then flushes; rank 1
polls until it holds every id. Two modes (see ``MODES``): burst sends as fast as ``send`` returns, paced waits
after each send until the message has left, so that every message crosses on its own. The payload is all
ones, so a message that holds ids ``[lo, hi)`` must have every element equal to ``hi - lo``: rank 1 checks
that on the first and last element of every message (an integrity check that survives coalescing).

The same child code runs against two dasgd trees, each pair of processes importing one of them
(``PYTHONPATH``): this working tree, and a baseline revision extracted with ``git archive`` (default
``HEAD``; ``--baseline REV``, or ``--no-baseline``). Pairs alternate (baseline, this tree, this tree,
baseline, ...) for ``--rounds`` rounds, each pair running ``--trials`` trials of every mode, with and
without a shared key (``--plain-only`` skips the keyed runs). One thread per process in both trees.
Medians over every trial of a tree are reported. What changed between the trees in issue 12: the handshake
when a link opens (not in the timed part), and the two-phase receive: a fixed-size slot receive for the
header (plus clock and a payload of at most 64 KiB), then the payload as its own transfer, sized from the
verified header and bound to it by a digest (crc32, or SHA-256 with a key).

Rates over rank 1's time from the start barrier to holding all N ids:
- msgs/s: messages that crossed the link per second (paced: every message crosses alone);
- wire MB/s: payload bytes that crossed the link (messages received x d x 4);
- gradient MB/s: gradient bytes delivered (N x d x 4). A slow receiver gets gradients coalesced (summed, with
  their id ranges), so this can exceed the wire rate; it is what training sees.
Also measured, in this process: the payload digest's cost per MB (crc32, SHA-256) against a memory copy,
which is what a split-plane peer pays per payload on the host (after a device-to-host copy on a GPU).

    python benchmarks/bench_transport.py [--quick] [--out results.json] [--baseline REV | --no-baseline]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

__all__ = ["digest_costs", "main", "run_pair", "transport_child"]

FULL = {1_000: 4000, 10_000: 4000, 100_000: 2000, 1_000_000: 200}
"""d (floats per gradient) -> N (messages per trial) of the full version. 1k and 10k floats ride in the
header's slot in the new tree (at most 64 KiB); 100k and 1M are detached payloads."""
QUICK = {1_000: 1000, 100_000: 300}
RECEIVE_TIMEOUT_S = 120.0
MODES = ("burst", "paced")
"""burst: send N as fast as send() returns (a busy link gets them coalesced); paced: wait after each send
until the transport handed it to the network, so every message crosses on its own (the link's own rate)."""
KEY = b"bench-transport-shared-secret"
ROOT = Path(__file__).resolve().parent.parent


def transport_child(d: int, n: int, trials: int, keyed: bool, result: str) -> None:
    """One rank of the pair (runs in its own process under the environment ``_common.run_ranks`` sets)."""
    from datetime import timedelta

    import numpy as np
    import torch
    import torch.distributed as dist

    import dasgd
    from dasgd.core import wire
    from dasgd.core.message import Kind, Message
    from dasgd.transport.torchdist import TorchDistTransport

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    rank = dist.get_rank()
    # Barriers on their own group: collectives must never share a group with the transport's threads.
    control = dist.new_group(backend="gloo")
    transport = TorchDistTransport(rank, 2, d, torch.float32, key=KEY if keyed else None)
    payload = torch.ones(d, dtype=torch.float32)
    out: dict[str, Any] = {
        "rank": rank,
        "trials": [],
        "dasgd_file": dasgd.__file__,
        "wire_version": wire.WIRE_VERSION,
    }
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


def run_pair(d: int, n: int, trials: int, keyed: bool, src: Path | None = None) -> dict[str, Any]:
    """Run ``trials`` trials of each mode, N messages of d floats, in one fresh process pair that imports
    dasgd from ``src`` (None: whatever this interpreter finds)."""
    saved = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(src), *([saved] if saved else [])])
    try:
        sender, receiver = _common.run_ranks(
            __file__,
            [str(d), str(n), str(trials), "1" if keyed else "0"],
            world_size=2,
            timeout=120 + 60 * trials,
        )
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    rows = []
    for s, r in zip(sender["trials"], receiver["trials"]):
        rows.append(
            {
                "mode": s["mode"],
                "memcpy_MBps": n * d * 4 / s["memcpy_s"] / 1e6,
                "msgs_per_s": r["received_messages"] / r["receive_s"],
                "wire_MBps": r["received_messages"] * d * 4 / r["receive_s"] / 1e6,
                "gradient_MBps": n * d * 4 / r["receive_s"] / 1e6,
                "receive_s": r["receive_s"],
                "send_return_s": s["send_return_s"],
                "sent_messages": s["sent_messages"],
                "received_messages": r["received_messages"],
                "polled_messages": r["polled_messages"],
                "complete": r["complete"],
                "intact": r["intact"],
            }
        )
    return {
        "rows": rows,
        "dasgd_file": receiver["dasgd_file"],
        "wire_version": receiver["wire_version"],
        "sender_stats": sender["transport_stats"],
        "receiver_stats": receiver["transport_stats"],
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"memcpy_MBps": statistics.median(r["memcpy_MBps"] for r in rows)}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        out[mode] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("msgs_per_s", "wire_MBps", "gradient_MBps", "received_messages")
        }
        out[mode]["trials"] = len(mine)
    out["all_complete_and_intact"] = all(r["complete"] and r["intact"] for r in rows)
    return out


def baseline_tree(rev: str, folder: Path) -> Path:
    """Extract ``src/`` of revision ``rev`` of this repository into ``folder``; return its ``src`` path.
    ``git archive`` reads the repository and writes nothing to it."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(folder, filter="data")
    return folder / "src"


def digest_costs(sizes: list[int], repeats: int = 5) -> list[dict[str, float]]:
    """Per-payload host cost of the digest the new wire puts in a detached payload's header: crc32
    (unsigned) and SHA-256 (signed), against a memory copy of the same payload, one thread."""
    import torch

    from dasgd.core.wire import payload_digest

    torch.set_num_threads(1)
    out = []
    for d in sizes:
        src = torch.ones(d, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)
        timings: dict[str, list[float]] = {"memcpy": [], "crc32": [], "sha256": []}
        for _ in range(repeats):
            for name in timings:
                t0 = time.perf_counter()
                if name == "memcpy":
                    dst.copy_(src)
                else:
                    payload_digest(src, signed=name == "sha256")
                timings[name].append(time.perf_counter() - t0)
        row = {"d": d, "MB": d * 4 / 1e6}
        for name, values in timings.items():
            best = min(values)
            row[f"{name}_ms"] = best * 1e3
            row[f"{name}_MBps"] = d * 4 / best / 1e6
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short version (about 2 minutes)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument(
        "--trials", type=int, help="trials per mode in each process pair (default 2; --quick 1)"
    )
    parser.add_argument("--rounds", type=int, help="process pairs per tree and size, alternating (default 2)")
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare against (default HEAD)")
    parser.add_argument("--no-baseline", action="store_true", help="measure this tree only")
    parser.add_argument("--plain-only", action="store_true", help="skip the runs with a shared key")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        d, n, trials, keyed = rest
        transport_child(int(d), int(n), int(trials), keyed == "1", args.result)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    trials = args.trials or (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 2)
    plan = QUICK if args.quick else FULL
    variants = [False] if args.plain_only else [False, True]

    command = _common.command_line()
    facts = _common.machine_facts()
    _common.print_header("bench_transport: TorchDistTransport, this tree against a baseline", facts, command)
    meter = _common.OtherLoad()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dasgd-baseline-") as tmp:
        trees: dict[str, Path] = {"new": ROOT / "src"}
        if not args.no_baseline:
            trees = {"baseline": baseline_tree(args.baseline, Path(tmp)), **trees}
            print(f"baseline: {args.baseline} ({_rev(args.baseline)}), extracted to {trees['baseline']}")
        print(f"new: this working tree ({_rev('HEAD')} + uncommitted changes)")
        results = []
        for d, n in plan.items():
            for keyed in variants:
                per_tree: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
                meta: dict[str, Any] = {}
                for rnd in range(rounds):
                    # Alternate which tree goes first, so slow drift in the machine's load hits both alike.
                    order = list(trees) if rnd % 2 == 0 else list(reversed(trees))
                    for name in order:
                        pair = run_pair(d, n, trials, keyed, trees[name])
                        per_tree[name] += pair["rows"]
                        meta[name] = {"wire_version": pair["wire_version"], "dasgd_file": pair["dasgd_file"]}
                entry = {"d": d, "n": n, "keyed": keyed, "trees": {}}
                for name, rows in per_tree.items():
                    entry["trees"][name] = {**_summary(rows), **meta[name], "per_trial": rows}
                results.append(entry)
                _print_entry(entry)
        digests = digest_costs([10_000, 100_000, 1_000_000])
    elapsed = time.perf_counter() - t_start

    print()
    print("medians (MB = 1e6 bytes); ratio = new / baseline")
    header = "d (floats)  key    mode   tree       wire  msgs/s  wire MB/s  gradient MB/s  ok"
    print(header)
    for e in results:
        for mode in MODES:
            for name, t in e["trees"].items():
                m = t[mode]
                print(
                    f"{e['d']:>10,}  {'hmac' if e['keyed'] else 'none':<5}  {mode:<5}  {name:<9}  "
                    f"v{t['wire_version']}  {m['msgs_per_s']:>6.0f}  {m['wire_MBps']:>9.0f}  "
                    f"{m['gradient_MBps']:>13.0f}  {t['all_complete_and_intact']}"
                )
            if "baseline" in e["trees"]:
                old, new = e["trees"]["baseline"][mode], e["trees"]["new"][mode]
                print(
                    f"{'':>10}  {'':<5}  {mode:<5}  {'ratio':<9}      {new['msgs_per_s'] / old['msgs_per_s']:>6.2f}  "
                    f"{new['wire_MBps'] / old['wire_MBps']:>9.2f}  {new['gradient_MBps'] / old['gradient_MBps']:>13.2f}"
                )
    print()
    print("payload digest on the host, one thread (best of 5)")
    print("d (floats)      MB  memcpy ms  crc32 ms  sha256 ms  crc32 MB/s  sha256 MB/s")
    for row in digests:
        print(
            f"{row['d']:>10,}  {row['MB']:>6.2f}  {row['memcpy_ms']:>9.3f}  {row['crc32_ms']:>8.3f}  "
            f"{row['sha256_ms']:>9.3f}  {row['crc32_MBps']:>10.0f}  {row['sha256_MBps']:>11.0f}"
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
            "baseline": None if args.no_baseline else {"rev": args.baseline, "commit": _rev(args.baseline)},
            "elapsed_s": elapsed,
            "cpu_used_by_others": other_load,
            "results": results,
            "digest_costs": digests,
        },
    )
    return 0


def _print_entry(entry: dict[str, Any]) -> None:
    for name, t in entry["trees"].items():
        cells = ", ".join(
            f"{mode} {t[mode]['msgs_per_s']:.0f} msgs/s {t[mode]['gradient_MBps']:.0f} MB/s" for mode in MODES
        )
        print(
            f"d = {entry['d']:,}, key {'yes' if entry['keyed'] else 'no'}, {name} (v{t['wire_version']}): {cells}, "
            f"ok {t['all_complete_and_intact']}"
        )
    sys.stdout.flush()


def _rev(rev: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True
    )
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
