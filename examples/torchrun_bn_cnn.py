"""A small CNN with BatchNorm, SGD with momentum and a cosine schedule, under DASGD (practical mode).

    torchrun --standalone --nproc-per-node 2 examples/torchrun_bn_cnn.py

What differs from examples/torchrun_dasgd.py (the faithful, plain-SGD case):
- ``faithful=False``: momentum and weight decay run as each worker's local preconditioner; what a worker
  pushes is the update its optimizer made, and every replica applies every update once (outside the theory,
  and the report says so: ``faithful=False``);
- a learning-rate scheduler steps as usual: each update carries the stepsize it was made with;
- BatchNorm's running statistics are buffers, updated by each worker's own forward passes; ``finish()``
  averages them over the replicas (num_batches_tracked: the maximum), so evaluation uses the same model
  everywhere.
Uses scikit-learn's 8x8 digits so it runs in seconds.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import dasgd


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150, help="updates this worker computes")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    trainer = dasgd.DecentralizedSGD(model, optimizer, faithful=False)  # wrap after building and moving
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    generator = torch.Generator().manual_seed(1000 + rank)
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(0, len(x_train), (32,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        trainer.step()  # instead of optimizer.step()
        scheduler.step()

    report = trainer.finish()  # drain, average the BatchNorm buffers, compare replicas
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(
            f"workers={dist.get_world_size()} T={report.total_computed} applied={report.applied} "
            f"lost={report.lost} replicas_agree={report.replicas_agree} faithful={report.faithful} "
            f"stepsize_constant={report.stepsize_constant} buffer_spread={report.buffer_spread:.4g} "
            f"max_buffer_diff={report.max_buffer_diff:.4g} S_avg={report.s_avg:.2f} "
            f"test_accuracy={accuracy:.4f}"
        )
    trainer.close()
    os._exit(0)  # skip interpreter teardown: Gloo's background receive may still be posted


if __name__ == "__main__":
    main()
