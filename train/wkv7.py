"""The WKV-7 operator of RWKV-7 (x070): the generalised delta rule with a matrix-valued state.

Per batch and head, with N = 64 channels, state S (N x N) indexed [value i, key j]:

    d_t = exp(-exp(w_t))                                  (decay factor; w as the model computes it)
    S_t = S_{t-1} (diag(d_t) + a_t b_t^T) + v_t k_t^T
    y_t = S_t r_t

``wkv7_reference`` is the recurrence as a pure-PyTorch loop over T (autograd differentiates it); it is
the oracle for the compiled kernels and the fallback backend.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "cuda", "cpu", "reference")
HEAD_SIZE = 64


def _check_inputs(tensors: dict[str, torch.Tensor], state: torch.Tensor | None) -> None:
    r = tensors["r"]
    if r.dim() != 4:
        raise ValueError(f"wkv7: r must be (B, T, H, N); got shape {tuple(r.shape)}")
    for name, x in tensors.items():
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, r has {tuple(r.shape)}")
        if x.dtype != r.dtype:
            raise ValueError(f"wkv7: {name} is {x.dtype}, r is {r.dtype}")
    B, _, H, N = r.shape
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv7: state must be {(B, H, N, N)}; got {tuple(state.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def wkv7_reference(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch WKV-7: a Python loop over T in fp32 (fp64 for fp64 inputs).

    r, w, k, v, a, b: (B, T, H, N); state: (B, H, N, N) or None (zeros). Returns y (B, T, H, N) in the
    inputs' dtype and the final state (B, H, N, N) in the compute dtype. Differentiable in all inputs.
    """
    _check_inputs({"r": r, "w": w, "k": k, "v": v, "a": a, "b": b}, state)
    B, T, H, N = r.shape
    in_dtype, cdt = r.dtype, _compute_dtype(r.dtype)
    r, w, k, v, a, b = (x.to(cdt) for x in (r, w, k, v, a, b))
    decay = torch.exp(-torch.exp(w))
    s = torch.zeros(B, H, N, N, dtype=cdt, device=r.device) if state is None else state.to(cdt)
    ys = []
    for t in range(T):
        # S (diag(d) + a b^T) = S * d[key] + (S a) b^T
        sa = torch.einsum("bhij,bhj->bhi", s, a[:, t])
        s = (
            s * decay[:, t, :, None, :]
            + sa[..., :, None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhij,bhj->bhi", s, r[:, t]))
    y = torch.stack(ys, dim=1) if ys else r.new_empty(r.shape)
    return y.to(in_dtype), s


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 over (B, T, H, N) inputs from `state` ((B, H, N, N) fp32, zeros when None).

    Returns y (the inputs' dtype) and the final state (fp32; fp64 for fp64 inputs); differentiable
    in all six inputs and the initial state. backend: auto | cuda | cpu | reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"wkv7: unknown backend {backend!r}; choose one of {BACKENDS}")
    # The compiled CUDA kernel and CPU twin land next; until then every backend runs the reference.
    return wkv7_reference(r, w, k, v, a, b, state)
