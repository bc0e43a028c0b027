"""Gradients of many virtual workers in one vectorised call.

Where models are small (logistic regression, the quadratic), computing one gradient at a time is dominated by
Python and dispatch overhead. ``torch.func.vmap`` over ``grad`` computes the gradients of many replicas of
the same architecture at once, each at its own parameters on its own batch, through the task's own loss (the
task's module is called with the replica's parameters swapped in by ``functional_call``). The results equal
one-by-one computation up to float rounding; tests/test_sim.py checks it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dasgd.tasks import Batch, Task

__all__ = ["BatchedGradients"]


class _TaskLoss(nn.Module):
    """``forward(x, y) = task.loss(inner, Batch(x, y))``, so functional_call can swap inner's parameters."""

    def __init__(self, task: Task, inner: nn.Module, labelled: bool) -> None:
        super().__init__()
        self.task = task
        self.inner = inner
        self.labelled = labelled

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task.loss(self.inner, Batch(x, y if self.labelled else None))


class BatchedGradients:
    """Flat gradients of replicas of ``template`` (a model built by ``task``), many at a time.

    Args:
        task: the workload (its ``loss`` is used unchanged).
        template: one replica; only its architecture and parameter shapes are used.
        chunk: replicas per vectorised call (bounds peak memory).
    """

    def __init__(self, task: Task, template: nn.Module, chunk: int = 256) -> None:
        self._shapes = [
            (f"inner.{name}", p.shape, p.numel())
            for name, p in template.named_parameters()
            if p.requires_grad
        ]
        self._task = task
        self._template = template
        self._chunk = chunk

    def _fn(self, labelled: bool):
        module = _TaskLoss(self._task, self._template, labelled)
        shapes = self._shapes

        def loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            params, offset = {}, 0
            for name, shape, n in shapes:
                params[name] = flat[offset : offset + n].view(shape)
                offset += n
            return functional_call(module, params, (x, y))

        return vmap(grad_and_value(loss))

    def compute(
        self, params: list[torch.Tensor], batches: list[Batch]
    ) -> tuple[list[torch.Tensor], list[float]]:
        """Gradients (fresh flat tensors) and losses of each replica ``params[i]`` on ``batches[i]``."""
        if len(params) != len(batches):
            raise ValueError("one batch per replica is needed")
        grads: list[torch.Tensor] = []
        losses: list[float] = []
        if not params:
            return grads, losses
        labelled = batches[0].y is not None
        fn = self._fn(labelled)
        for start in range(0, len(params), self._chunk):
            sl = slice(start, start + self._chunk)
            flat = torch.stack([p.detach() for p in params[sl]])
            x = torch.stack([b.x for b in batches[sl]])
            y = torch.stack([b.y for b in batches[sl]]) if labelled else torch.zeros(len(x))
            g, v = fn(flat, x, y)
            grads.extend(g.unbind(0))
            losses.extend(v.tolist())
        return [g.clone() for g in grads], losses
