"""Your own PyTorch training loop, made DASGD by three lines (marked # DASGD).

Run on one machine with 4 workers:
    torchrun --standalone --nproc-per-node 4 examples/torchrun_dasgd.py
or across machines with torchrun's usual --nnodes/--rdzv-endpoint flags. Uses scikit-learn's digits data so it
runs in seconds; swap in your own model and data loader.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits

import dasgd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300, help="gradients this worker computes")
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the wrapper also broadcasts rank 0's initial weights

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    trainer = dasgd.DecentralizedSGD(model, optimizer)  # DASGD 1/3: wrap model and optimizer

    generator = torch.Generator().manual_seed(1000 + rank)  # homogeneous data, each worker its own order
    for _ in range(args.steps):
        idx = torch.randint(0, len(x_train), (64,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        trainer.step()  # DASGD 2/3: instead of optimizer.step()

    report = trainer.finish()  # DASGD 3/3: drain, so every replica holds every gradient
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(
            f"workers={dist.get_world_size()} T={report.total_computed} applied={report.applied} "
            f"lost={report.lost} replicas_agree={report.replicas_agree} S_avg={report.s_avg:.2f} "
            f"S_max={report.s_max} test_accuracy={accuracy:.4f}"
        )
    trainer.close()
    os._exit(0)  # skip interpreter teardown: Gloo's background receive may still be posted


if __name__ == "__main__":
    main()
