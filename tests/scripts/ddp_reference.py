"""One rank of PyTorch DDP on digits-logreg with dasgd's seeds and data order (the sync oracle).

Usage: RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python ddp_reference.py STEPS OUT.npy
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dasgd.experiments.spec import resolve_spec
from dasgd.runs.build import build_sampler, build_task, resolve


def main() -> None:
    steps, out = int(sys.argv[1]), sys.argv[2]
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=n)
    spec = resolve_spec({}, task="digits-logreg", workers=n, algorithm="sync", seed=5)
    task = build_task(spec)
    resolved = resolve(spec)
    model = task.build_model(spec.seed)
    ddp = DistributedDataParallel(model)
    sampler = build_sampler(spec, rank, task, resolved)
    opt = torch.optim.SGD(ddp.parameters(), lr=resolved.lr)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(ddp, sampler.next()).backward()
        opt.step()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    np.save(out, flat)
    dist.barrier()  # nobody leaves while another rank still uses the connections
    sys.stdout.flush()
    # destroy_process_group after DDP sometimes aborts inside Gloo at exit; the result is written, so leave.
    os._exit(0)


if __name__ == "__main__":
    main()
