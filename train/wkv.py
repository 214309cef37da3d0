"""The WKV operator of RWKV-4 (time-mixing recurrence), with a pure-PyTorch reference.

Per channel c, with w = -exp(time_decay) and u = time_first:

    y_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (same with v -> 1)

``wkv_reference`` computes it in O(T) with a running maximum exponent, so nothing overflows
for large |k|; autograd differentiates it.
"""

from __future__ import annotations

import torch

# Stands in for log(0) in the running-max state; finite so that differences stay finite.
MIN_EXP = -1e38


def _check_shapes(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"wkv: k and v must both be (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    C = k.shape[2]
    if time_decay.shape != (C,) or time_first.shape != (C,):
        raise ValueError(
            f"wkv: time_decay and time_first must be ({C},); "
            f"got {tuple(time_decay.shape)} and {tuple(time_first.shape)}"
        )


def wkv_reference(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Pure-PyTorch WKV: a Python loop over T, fp32 compute (fp64 for fp64 inputs).

    Same running-max form as RWKV-LM's v4 CUDA kernel; differentiable in all four inputs.
    Returns y of k's dtype and shape (B, T, C).
    """
    _check_shapes(time_decay, time_first, k, v)
    cdt = torch.float64 if k.dtype == torch.float64 else torch.float32
    w = -torch.exp(time_decay.to(cdt))
    u = time_first.to(cdt)
    kc, vc = k.to(cdt), v.to(cdt)
    B, T, C = k.shape
    aa = torch.zeros(B, C, dtype=cdt, device=k.device)
    bb = torch.zeros(B, C, dtype=cdt, device=k.device)
    pp = torch.full((B, C), MIN_EXP, dtype=cdt, device=k.device)
    ys = []
    for t in range(T):
        kk, vv = kc[:, t], vc[:, t]
        ww = u + kk
        p = torch.maximum(pp, ww)
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vv) / (e1 * bb + e2))
        ww = w + pp
        p = torch.maximum(ww, kk)
        e1 = torch.exp(ww - p)
        e2 = torch.exp(kk - p)
        aa = e1 * aa + e2 * vv
        bb = e1 * bb + e2
        pp = p
    return torch.stack(ys, dim=1).to(k.dtype)


def wkv(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    t_max: int | None = None,
) -> torch.Tensor:
    """WKV of RWKV-4: time_decay, time_first (C,) as stored; k, v (B, T, C) -> y (B, T, C)."""
    if backend not in ("auto", "cuda", "cpu", "reference"):
        raise ValueError(f"wkv: unknown backend {backend!r} (expected auto, cuda, cpu or reference)")
    return wkv_reference(time_decay, time_first, k, v)
