"""The WKV-6 operator of RWKV-6 (x060) and RWKV-5 (x052): linear attention with a matrix-valued state,
a per-channel decay and a bonus u for the current token. RWKV-5 is the case of a decay constant in time.

Per batch and head, with N = 64 channels, state S (N x N) indexed [key i, value j]:

    d_t = exp(-exp(w_t))                                   (decay factor; w as the model computes it)
    y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j] + S_{t-1}[i, j])
    S_t = diag(d_t) S_{t-1} + k_t v_t^T

``wkv6_reference`` is the recurrence as a pure-PyTorch loop over T (autograd differentiates it); it is
the oracle for the compiled kernels and the fallback backend. ``wkv6`` runs the compiled kernels of
``cuda/`` (``wkv6_cuda.cu`` on CUDA tensors, its CPU twin ``wkv6_cpu.cpp`` otherwise; both run the
workers of ``wkv6_math.h``), built just in time and cached by ``train.ext_build`` as ``train.wkv7``'s are.

Backward scheme: exact for any decay in [0, 1] (RWKV-6's trained decays reach near 0, so S_{t-1} is
never rebuilt from S_t by dividing by the decay). The forward stores S before every 16th step in scratch
from PyTorch's allocator; the backward, walking the chunks from the last, recomputes the chunk's 16
states forward from its checkpoint (into a (B, H, 16, N, N) scratch) and then walks the chunk down with
the adjoint G = dL/dS_t, G <- diag(d_t) G + r_t gy_t^T. dL/du is summed over time in the kernels (per
batch) and over the batch here.

On a CUDA tensor ``auto`` means the CUDA kernel or an error with the compiler's message: a GPU never
falls back to the Python loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from train import ext_build
from train.ext_build import ExtensionBuildError as WKVBuildError  # noqa: F401  (the op's build error)
from train.wkv import CPU_CFLAGS, _device_of, _stream_args  # as RWKV-4's: flags, device and stream

CUDA_SRC_DIR = Path(__file__).resolve().parent.parent / "cuda"
BACKENDS = ("auto", "cuda", "cpu", "reference")
HEAD_SIZE = 64
CHUNK_LEN = 16  # steps between the forward's state checkpoints (wkv6_math::CHUNK)
KERNEL_DTYPES = {
    "cuda": (torch.float32, torch.bfloat16),
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
}
# No register cap (unlike RWKV-4's kernel): each thread keeps a 64-float row of the state in registers.
CUDA_CFLAGS = ["-O3", "--use_fast_math", "-Xptxas=-O3"]

# One entry per kind of extension: its sources and flags.
_SPECS: dict[str, dict] = {
    "cpu": {
        "sources": ["wkv6_cpu.cpp"],
        "extra_cflags": CPU_CFLAGS,
        "extra_ldflags": ["-fopenmp"],
    },
    "cuda": {
        "sources": ["wkv6_op.cpp", "wkv6_cuda.cu"],
        "extra_cflags": ["-O3"],
        "extra_cuda_cflags": CUDA_CFLAGS,
    },
}


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


def load_extension(kind: str, build_dir: str | os.PathLike | None = None) -> ModuleType:
    """The WKV-6 extension of `kind` ("cpu": the CPU twin, "cuda": the CUDA kernel), built on first use.

    build_dir: where (default $RWKV_WKV_BUILD_DIR, else torch's extensions cache); see train.ext_build.
    """
    if kind not in _SPECS:
        raise ValueError(f"wkv6: unknown extension kind {kind!r} (expected one of {', '.join(_SPECS)})")
    return ext_build.load_kernel(f"wkv6_{kind}", CUDA_SRC_DIR, _SPECS[kind], build_dir)


class _WKV6Function(torch.autograd.Function):
    """Inputs (r, w, k, v, u, state), outputs (y, final state); the forward's checkpoints of S every
    CHUNK_LEN steps ((B, H, ceil(T/16), N, N), compute dtype) are saved for backward."""

    @staticmethod
    def forward(ctx, r, w, k, v, u, state, ext):  # type: ignore[override]
        B, T, H, N = r.shape
        cdt = _compute_dtype(r.dtype)
        xs = [x.detach().contiguous() for x in (r, w, k, v)]
        u_c = u.detach().to(cdt).contiguous()
        s0 = state.detach().to(cdt).contiguous()
        y = torch.empty_like(xs[0])
        s_out = torch.empty_like(s0)
        ckpt = torch.empty((B, H, -(-T // CHUNK_LEN), N, N), dtype=cdt, device=r.device)
        with _device_of(r):
            ext.forward(*xs, u_c, s0, y, s_out, ckpt, *_stream_args(r))
        ctx.save_for_backward(*xs, u_c, ckpt)
        ctx.ext, ctx.u_dtype, ctx.state_dtype = ext, u.dtype, state.dtype
        return y, s_out

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gs):  # type: ignore[override]
        *xs, u_c, ckpt = ctx.saved_tensors
        r = xs[0]
        B, T, H, N = r.shape
        # Either output may have had no gradient: autograd passes None (or zeros, materialised).
        gy = torch.zeros_like(r) if gy is None else gy.to(r.dtype).contiguous()
        gs = torch.zeros((B, H, N, N), dtype=ckpt.dtype, device=r.device) if gs is None else gs
        gs = gs.to(ckpt.dtype).contiguous()
        grads = [torch.empty_like(x) for x in xs]
        gs_in = torch.empty_like(gs)
        gu = torch.empty((B, H, N), dtype=ckpt.dtype, device=r.device)
        scratch = torch.empty((B, H, CHUNK_LEN, N, N), dtype=ckpt.dtype, device=r.device)
        with _device_of(r):
            ctx.ext.backward(*xs, u_c, gy, ckpt, gs, scratch, gs_in, *grads, gu, *_stream_args(r))
        return (*grads, gu.sum(0).to(ctx.u_dtype), gs_in.to(ctx.state_dtype), None)


def _kernel_for(r: torch.Tensor, backend: str, build_dir) -> ModuleType | None:
    """The extension to run r on, or None for the reference (see ``train.ext_build.choose_kernel``)."""
    return ext_build.choose_kernel("wkv6", r, backend, KERNEL_DTYPES, HEAD_SIZE,
                                   lambda kind: load_extension(kind, build_dir))


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
    differentiable in every input, u (summed over batch and time) and the initial state, and takes a
    gradient on the final state (segments chained through it). Any T >= 0, any decay.
    backend: "cuda" (CUDA tensors, fp32/bf16, N = 64), "cpu" (the CPU twin, fp32/bf16/fp64, N = 64),
    "reference" (pure PyTorch, any N), or "auto" (see ``_kernel_for``).
    build_dir: where extensions are built (else $RWKV_WKV_BUILD_DIR, else torch's extensions cache).
    """
    if backend not in BACKENDS:
        raise ValueError(f"wkv6: unknown backend {backend!r}; choose one of {BACKENDS}")
    _check_inputs({"r": r, "w": w, "k": k, "v": v}, u, state)
    if backend == "reference":
        return wkv6_reference(r, w, k, v, u, state)
    ext = _kernel_for(r, backend, build_dir)
    if ext is None:
        return wkv6_reference(r, w, k, v, u, state)
    B, T, H, N = r.shape
    cdt = _compute_dtype(r.dtype)
    if state is None:
        state = torch.zeros((B, H, N, N), dtype=cdt, device=r.device)
    if T == 0:  # nothing to run: the state passes through (with its gradient), as in the reference
        return r.new_empty(r.shape), state.to(cdt).clone()
    return _WKV6Function.apply(r, w, k, v, u, state, ext)
