"""The WKV-6 operator of RWKV-6 (x060) and RWKV-5 (x052): linear attention with a matrix-valued state,
a per-channel decay and a bonus u for the current token. RWKV-5 is the case of a decay constant in time.

Per batch and head, with N = 64 channels, state S (N x N) indexed [key i, value j]:

    d_t = exp(-exp(w_t))                                   (decay factor; w as the model computes it)
    y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j] + S_{t-1}[i, j])
    S_t = diag(d_t) S_{t-1} + k_t v_t^T

``wkv6_reference`` is the recurrence as a pure-PyTorch loop over T (autograd differentiates it); it is
the oracle for the compiled kernels and the fallback backend.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "cuda", "cpu", "reference")
HEAD_SIZE = 64


def _check_inputs(tensors: dict[str, torch.Tensor], u: torch.Tensor, state: torch.Tensor | None) -> None:
    r = tensors["r"]
    if r.dim() != 4:
        raise ValueError(f"wkv6: r must be (B, T, H, N); got shape {tuple(r.shape)}")
    for name, x in tensors.items():
        if x.shape != r.shape:
            raise ValueError(f"wkv6: {name} has shape {tuple(x.shape)}, r has {tuple(r.shape)}")
        if x.dtype != r.dtype:
            raise ValueError(f"wkv6: {name} is {x.dtype}, r is {r.dtype}")
        if x.device != r.device:
            raise ValueError(f"wkv6: {name} is on {x.device}, r on {r.device}")
    if not r.is_floating_point():
        raise ValueError(f"wkv6: inputs must be floating point, got {r.dtype}")
    B, _, H, N = r.shape
    if tuple(u.shape) != (H, N):
        raise ValueError(f"wkv6: u must be {(H, N)}; got {tuple(u.shape)}")
    if not u.is_floating_point() or u.device != r.device:
        raise ValueError(f"wkv6: u must be a floating-point tensor on {r.device}; "
                         f"got {u.dtype} on {u.device}")
    if state is None:
        return
    if tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv6: state must be {(B, H, N, N)}; got {tuple(state.shape)}")
    if not state.is_floating_point() or state.device != r.device:
        raise ValueError(f"wkv6: state must be a floating-point tensor on {r.device}; "
                         f"got {state.dtype} on {state.device}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def wkv6_reference(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch WKV-6: a Python loop over T in fp32 (fp64 for fp64 inputs).

    r, w, k, v: (B, T, H, N); u: (H, N); state: (B, H, N, N) or None (zeros). Returns y (B, T, H, N) in
    the inputs' dtype and the final state (B, H, N, N) in the compute dtype. Differentiable in all inputs.
    """
    _check_inputs({"r": r, "w": w, "k": k, "v": v}, u, state)
    B, T, H, N = r.shape
    in_dtype, cdt = r.dtype, _compute_dtype(r.dtype)
    r, w, k, v = (x.to(cdt) for x in (r, w, k, v))
    u = u.to(cdt)
    decay = torch.exp(-torch.exp(w))
    s = torch.zeros(B, H, N, N, dtype=cdt, device=r.device) if state is None else state.to(cdt)
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [b, h, i, j]
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], s + u[None, :, :, None] * kv))
        s = decay[:, t, :, :, None] * s + kv
    y = torch.stack(ys, dim=1) if ys else r.new_empty(r.shape)
    return y.to(in_dtype), s


def wkv6(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str = "auto",
    build_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-6 over (B, T, H, N) inputs with bonus u (H, N) from `state` ((B, H, N, N) fp32, zeros when
    None). Returns y (the inputs' dtype) and the final state (fp32; fp64 for fp64 inputs);
    differentiable in every input and the initial state. Any T >= 0.
    backend: "cuda", "cpu", "reference" or "auto" (until the compiled kernels land, all run the reference).
    """
    if backend not in BACKENDS:
        raise ValueError(f"wkv6: unknown backend {backend!r}; choose one of {BACKENDS}")
    return wkv6_reference(r, w, k, v, u, state)
