"""Skipping an optimizer step whose loss is non-finite, with no host sync per micro-batch.

A NaN in the forward pass cannot be kept out of the backward pass by scaling the loss: `nan * 0`
is NaN, and every weight whose input activations are NaN gets `activation^T @ grad = NaN` even
when the incoming gradient is exactly zero. So the guard works on the parameters' gradients:

1. `GradientGate`: a hook on every parameter selects, with `torch.where` (a select, not a
   multiply), the micro-batch's gradient when its loss was finite and exact zeros otherwise.
   The flag is a device tensor, set after the forward pass without reading it on the host; the
   hook runs before autograd accumulates into `p.grad`, hence before DeepSpeed's
   post-accumulate hooks (ZeRO 1/2/3 and the bf16 optimizer reduce gradients from those). So
   no NaN reaches DeepSpeed's buffers, its all-reduce / reduce-scatter or its gradient norm.
2. The step's flags are all-reduced once, right before the engine's accumulation-boundary
   `step()`. If any rank had a non-finite micro-batch, that `step()` runs inside
   `optimizer_update_skipped`: DeepSpeed still runs its step (gradient reduction epilogue,
   norm, clipping, fp32 -> bf16 copy, zero_grad, counters), but the wrapped torch optimizer's
   own `step()` (Adam: moments, step count, weights) is a no-op. The fp32 master weights and
   the optimizer state are untouched, and the low-precision weights DeepSpeed copies back from
   the fp32 masters are the same values as before.

Why not DeepSpeed's own overflow skip: it only happens when its gradient norm is non-finite
(which the gate prevents, and which bf16 ZeRO 1/2 ignores when bf16.check_grad_overflow is off,
and ZeRO 1/2 does not compute with zero_optimization.compute_grad_norm off), and a plain
torch optimizer at ZeRO stage 0 in fp32 has none at all. Setting lr 0 is not enough either:
Adam still updates its moments and step count.

DeepSpeed internals relied on (deepspeed 0.19.8): every optimizer wrapper (ZeRO 1/2
`DeepSpeedZeroOptimizer`, ZeRO 3 `DeepSpeedZeroOptimizer_Stage3`, `BF16_Optimizer`, the fp16
optimizers) keeps the torch optimizer it wraps as `.optimizer` and updates through its
`.optimizer.step()` (ZeRO 3 with offload also through `.backup_optimizer`); without a wrapper
`engine.optimizer` is the torch optimizer. tests/test_train_distributed.py checks the weights
and optimizer state bit for bit across a skipped step for ZeRO 1/2/3 in fp32 and bf16.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class GradientGate:
    """Per-parameter hooks passing a micro-batch's gradient only when its loss was finite."""

    def __init__(self, params: Iterable[torch.nn.Parameter], device: torch.device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self._handles = [p.register_hook(self._gate) for p in params if p.requires_grad]

    def _gate(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.where(self.ok, grad, grad.new_zeros(()))  # a select: NaN in `grad` cannot leak

    def set(self, loss: torch.Tensor) -> torch.Tensor:
        """Gate the next backward pass on `loss` being finite (on device); returns the flag."""
        self.ok = torch.isfinite(loss.detach())
        return self.ok

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def torch_optimizers(engine_optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers whose step() updates weights and state under a DeepSpeed engine."""
    if isinstance(engine_optimizer, torch.optim.Optimizer):
        return [engine_optimizer]  # no DeepSpeed wrapper (ZeRO 0 in fp32)
    found = [
        getattr(engine_optimizer, name, None) for name in ("optimizer", "backup_optimizer")
    ]
    found = [o for o in found if isinstance(o, torch.optim.Optimizer)]
    if not found:
        raise TypeError(
            f"cannot find the torch optimizer inside {type(engine_optimizer).__name__}; the "
            "non-finite step skip does not know this DeepSpeed optimizer wrapper"
        )
    return found


def _no_update(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def optimizer_update_skipped(engine_optimizer: Any) -> Iterator[None]:
    """Within the block, the wrapped torch optimizers' step() does nothing (see the module docstring)."""
    opts = torch_optimizers(engine_optimizer)
    for opt in opts:
        opt.step = _no_update  # an instance attribute shadows the class's step for this block only
    try:
        yield
    finally:
        for opt in opts:
            del opt.step
