"""Language-model loss: next-token cross entropy, with RWKV-LM's L2Wrap.

L2Wrap (RWKV-LM v4neo `src/model.py`) leaves the loss value alone and adds, in the backward pass, a
gradient of 1e-4 / (B * T) on each position's largest logit, which keeps logits from drifting
upward (it matters for bf16 stability in long runs). Unlike RWKV-LM it is scaled by the incoming
gradient, so DeepSpeed's loss scaling and gradient-accumulation division apply to it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class L2Wrap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, -1, keepdim=True)
        gy = torch.zeros_like(logits)
        gy.scatter_(-1, ids, maxx * factor)
        return grad_output, gy * grad_output.to(gy.dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, l2wrap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, plain cross entropy) for a batch."""
    ce = cross_entropy(logits, targets)
    return (L2Wrap.apply(ce, logits) if l2wrap else ce), ce
