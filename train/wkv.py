"""The WKV operator of RWKV-4 (time-mixing recurrence), with a pure-PyTorch reference.

Per channel c, with w = -exp(time_decay) and u = time_first:

    y_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (same with v -> 1)

``wkv_reference`` computes it in O(T) with a running maximum exponent, so nothing overflows
for large |k|; autograd differentiates it. ``wkv`` runs the compiled kernels of ``cuda/`` (the CUDA
extension on CUDA tensors, its CPU twin otherwise), both built just in time with ninja and cached
(``train.ext_build``). A sequence may run in chunks of ``chunk_len`` steps with the recurrent state
carried across them (it bounds the backward's scratch memory; results are the same).
``wkv_with_state`` is the stateful, gradient-free form that RNN-mode inference uses; ``wkv_state`` is
the stateful, differentiable form that training across segments of a long window uses.

State gradients. The state (aa, bb, pp) stands for the decayed sums A = aa * e^pp, B = bb * e^pp; pp
is a normaliser (a running maximum exponent) and carries no gradient. ``wkv_state`` returns
dL/daa_0, dL/dbb_0 of the input state (zero for pp) taking the incoming dL/daa_T, dL/dbb_T of the
output state with pp_T held fixed; chained from one call to the next this is the exact gradient of
the whole sequence (the kernels work on A and B, see cuda/wkv4_math.h), and the reference computes
the same by autograd with every normaliser detached.

On a CUDA tensor ``auto`` means the CUDA kernel or an error with the compiler's message: a GPU never
falls back to the Python loop.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from train import ext_build
from train.ext_build import BUILD_DIR_ENV  # noqa: F401  (re-exported: where builds go)
from train.ext_build import ExtensionBuildError as WKVBuildError

CUDA_SRC_DIR = Path(__file__).resolve().parent.parent / "cuda"
BACKENDS = ("auto", "cuda", "cpu", "reference")
KERNEL_DTYPES = {
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}

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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def initial_state(B: int, C: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(aa, bb, pp) of an empty history, shape (3, B, C): zero sums, log-scale at 'minus infinity'."""
    state = torch.zeros((3, B, C), dtype=dtype, device=device)
    state[2].fill_(MIN_EXP)
    return state


def _reference_scan(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence as a Python loop over T, in the dtype of w; returns y and the final (aa, bb, pp).

    The running maxima (p, pp) are detached: y does not depend on them (they scale numerator and
    denominator alike), and aa, bb then differentiate as A, B scaled by constants (module docstring)."""
    aa, bb, pp = state.unbind(0)
    pp = pp.detach()
    ys = []
    for t in range(k.shape[1]):
        kk, vv = k[:, t], v[:, t]
        ww = u + kk
        p = torch.maximum(pp, ww.detach())
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vv) / (e1 * bb + e2))
        ww = w + pp
        p = torch.maximum(ww.detach(), kk.detach())
        e1 = torch.exp(ww - p)
        e2 = torch.exp(kk - p)
        aa = e1 * aa + e2 * vv
        bb = e1 * bb + e2
        pp = p
    y = torch.stack(ys, dim=1) if ys else k.new_empty(k.shape)
    return y, torch.stack([aa, bb, pp])


def wkv_reference(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Pure-PyTorch WKV: a Python loop over T, fp32 compute (fp64 for fp64 inputs).

    Same running-max form as RWKV-LM's v4 CUDA kernel; differentiable in all four inputs.
    Returns y of k's dtype and shape (B, T, C).
    """
    _check_shapes(time_decay, time_first, k, v)
    cdt = _compute_dtype(k.dtype)
    w = -torch.exp(time_decay.to(cdt))
    u = time_first.to(cdt)
    B, T, C = k.shape
    y, _ = _reference_scan(w, u, k.to(cdt), v.to(cdt), initial_state(B, C, cdt, k.device))
    return y.to(k.dtype)


def wkv_reference_state(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``wkv_reference`` after a given state (3, B, C): returns (y, state after the last step), both
    differentiable by autograd (pp carries no gradient; see the module docstring)."""
    _check_shapes(time_decay, time_first, k, v)
    cdt = _compute_dtype(k.dtype)
    w = -torch.exp(time_decay.to(cdt))
    u = time_first.to(cdt)
    y, out = _reference_scan(w, u, k.to(cdt), v.to(cdt), state.to(cdt))
    return y.to(k.dtype), out



# -ffast-math lets gcc call the vectorised expf of glibc (libmvec) in the lane loops; it is a compile
# flag only, so the library is not linked with crtfastmath and the process' float mode is untouched.
CPU_CFLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fopenmp-simd", "-DWKV_OMP_SIMD"]
# As RWKV-LM builds its v4 kernel: fast exp, a register cap that keeps enough threads resident.
CUDA_CFLAGS = ["-O3", "--use_fast_math", "--maxrregcount=60", "-Xptxas=-O3"]

# One entry per kind of extension: its sources and flags (the CPU twin runs fp32/bf16/fp16/fp64 on the
# host; the CUDA kernel fp32/bf16/fp16 on the GPU). Neither has a bound on T per call.
_SPECS: dict[str, dict] = {
    "cpu": {
        "sources": ["wkv4_cpu.cpp"],
        "extra_cflags": CPU_CFLAGS,
        "extra_ldflags": ["-fopenmp"],
    },
    "cuda": {
        "sources": ["wkv4_op.cpp", "wkv4_cuda.cu"],
        "extra_cflags": ["-O3"],
        "extra_cuda_cflags": CUDA_CFLAGS,
    },
}


def build_extension(
    name: str,
    sources: list[Path | str],
    extra_cflags: list[str] | None = None,
    extra_cuda_cflags: list[str] | None = None,
    extra_ldflags: list[str] | None = None,
    build_dir: str | os.PathLike | None = None,
) -> ModuleType:
    """JIT-build a WKV extension (see train.ext_build): keyed directory, one builder per key, compiler
    output in the WKVBuildError on failure. build_dir: default $RWKV_WKV_BUILD_DIR, else torch's cache."""
    return ext_build.build_extension(
        name,
        sources,
        extra_cflags=extra_cflags,
        extra_cuda_cflags=extra_cuda_cflags,
        extra_ldflags=extra_ldflags,
        build_dir=build_dir,
        include_dirs=[CUDA_SRC_DIR],
    )


def load_extension(kind: str, build_dir: str | os.PathLike | None = None) -> ModuleType:
    """The WKV extension of `kind` ("cpu": the CPU twin, "cuda": the CUDA kernel), built on first use."""
    if kind not in _SPECS:
        raise ValueError(f"wkv: unknown extension kind {kind!r} (expected one of {', '.join(_SPECS)})")
    return ext_build.load_kernel(f"wkv_{kind}", CUDA_SRC_DIR, _SPECS[kind], build_dir)


class _WKVFunction(torch.autograd.Function):
    """Runs an extension's forward/backward chunk by chunk, carrying (aa, bb, pp) and its adjoint.

    Returns (y, final state); state0 None starts from an empty history. Gradients of the state are
    those of ``wkv_state`` (pp held fixed, see the module docstring)."""

    @staticmethod
    def forward(ctx, time_decay, time_first, k, v, state0, ext, chunk):  # type: ignore[override]
        cdt = _compute_dtype(k.dtype)
        w = -torch.exp(time_decay.detach().to(cdt)).contiguous()
        u = time_first.detach().to(cdt).contiguous()
        k = k.detach().contiguous()
        v = v.detach().contiguous()
        B, T, C = k.shape
        y = torch.empty_like(k)
        if state0 is None:
            state = initial_state(B, C, cdt, k.device)
        else:
            state = state0.detach().to(cdt).contiguous().clone()
        starts = list(range(0, T, chunk))
        states = torch.empty((len(starts), 3, B, C), dtype=cdt, device=k.device)
        with _device_of(k):
            extra = _stream_args(k)
            for i, t0 in enumerate(starts):
                states[i].copy_(state)
                sl = slice(t0, t0 + chunk)
                ext.forward(w, u, k[:, sl], v[:, sl], y[:, sl], state, *extra)
        ctx.save_for_backward(w, u, k, v, y, states, state)
        ctx.ext, ctx.chunk = ext, chunk
        ctx.param_dtypes = (time_decay.dtype, time_first.dtype)
        ctx.state_dtype = None if state0 is None else state0.dtype
        return y, state

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gstate_out):  # type: ignore[override]
        w, u, k, v, y, states, final = ctx.saved_tensors
        ext, chunk = ctx.ext, ctx.chunk
        B, T, C = k.shape
        gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype).contiguous()
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        gstate = initial_state(B, C, w.dtype, k.device)
        if gstate_out is not None:
            # dL/dA_T = dL/daa_T * e^{-pp_T}: in the kernel's scaled form (sa, sb, sp) = (daa, dbb, -pp_T)
            gstate[0].copy_(gstate_out[0])
            gstate[1].copy_(gstate_out[1])
            gstate[2].copy_(-final[2])
        gw = torch.zeros((B, C), dtype=w.dtype, device=k.device)
        gu = torch.zeros_like(gw)
        gw_c, gu_c = torch.empty_like(gw), torch.empty_like(gw)
        with _device_of(k):
            extra = _stream_args(k)
            for i in reversed(range(states.shape[0])):
                sl = slice(i * chunk, (i + 1) * chunk)
                ext.backward(
                    *(w, u, k[:, sl], v[:, sl], y[:, sl], gy[:, sl], states[i]),
                    *(gstate, gw_c, gu_c, gk[:, sl], gv[:, sl]),
                    *extra,
                )
                gw += gw_c
                gu += gu_c
        g0 = None
        if ctx.state_dtype is not None and ctx.needs_input_grad[4]:
            # dL/dA_0 = ga * e^gp, and A_0 = aa_0 * e^pp_0: dL/daa_0 = ga * e^{gp + pp_0}
            scale = torch.exp(gstate[2] + states[0, 2])
            g0 = torch.stack([gstate[0] * scale, gstate[1] * scale, torch.zeros_like(scale)])
            g0 = g0.to(ctx.state_dtype)
        decay_dtype, first_dtype = ctx.param_dtypes
        return gw.sum(0).to(decay_dtype), gu.sum(0).to(first_dtype), gk, gv, g0, None, None


def _device_of(k: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes k's CUDA device current (the binding launches on the current device)."""
    return torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext()


def _stream_args(k: torch.Tensor) -> tuple[int, ...]:
    """The CUDA binding takes the current stream of k's device as an integer handle; the CPU one nothing."""
    if not k.is_cuda:
        return ()
    return (torch.cuda.current_stream(k.device).cuda_stream,)


def _kernel_for(k: torch.Tensor, backend: str, build_dir) -> ModuleType | None:
    """The extension to run k on, or None for the reference (only where that is allowed).

    auto: the CUDA kernel on CUDA tensors (a build failure or an unsupported dtype is an error: a GPU
    never falls back to the Python loop), the CPU twin on CPU tensors (falling back to the reference with
    a warning if it cannot be built), the reference elsewhere (with a warning: no kernel for that device).
    """
    kind = "cuda" if k.is_cuda else ("cpu" if k.device.type == "cpu" else None)
    if backend == "cuda" and kind != "cuda":
        raise ValueError("wkv: backend 'cuda' needs CUDA tensors")
    if backend == "cpu" and kind != "cpu":
        raise ValueError(f"wkv: backend 'cpu' needs CPU tensors, got {k.device}")
    if kind is None:
        warnings.warn(f"wkv: no WKV kernel for {k.device}; using the slow pure-PyTorch reference",
                      RuntimeWarning, stacklevel=3)
        return None
    if k.dtype not in KERNEL_DTYPES[kind]:
        if backend == "auto" and kind == "cpu":
            return None  # e.g. float16 on an old torch: the reference computes in fp32
        allowed = ", ".join(str(d).replace("torch.", "") for d in KERNEL_DTYPES[kind])
        raise ValueError(
            f"wkv: the {kind} kernel takes {allowed} inputs, got {k.dtype}"
            + ("; use backend='reference' for other dtypes" if kind == "cuda" else "")
        )
    try:
        return load_extension(kind, build_dir)
    except WKVBuildError as e:
        if backend != "auto" or kind == "cuda":
            raise
        warnings.warn(f"wkv: using the slow pure-PyTorch reference because {e}", RuntimeWarning, stacklevel=3)
        return None


def _prepare(time_decay, time_first, k, v, chunk_len, t_max):
    _check_shapes(time_decay, time_first, k, v)
    if k.dtype != v.dtype:  # e.g. one of them produced outside autocast: compute in the wider type
        common = torch.promote_types(k.dtype, v.dtype)
        k, v = k.to(common), v.to(common)
    if t_max is not None:  # the earlier name of chunk_len
        chunk_len = chunk_len or t_max
    if chunk_len is not None and chunk_len < 0:
        raise ValueError(f"wkv: chunk_len must be positive (or 0/None for no chunking), got {chunk_len}")
    return k, v, (chunk_len or None)


def wkv(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    chunk_len: int | None = None,
    build_dir: str | os.PathLike | None = None,
    *,
    t_max: int | None = None,
) -> torch.Tensor:
    """WKV of RWKV-4: time_decay, time_first (C,) as stored; k, v (B, T, C) -> y (B, T, C) of k's dtype.

    backend: "cuda" (CUDA tensors; fp32/bf16/fp16), "cpu" (the CPU twin; fp32/bf16/fp16/fp64),
    "reference" (pure PyTorch), or "auto" (see ``_kernel_for``). Differentiable in all four inputs.
    chunk_len: run the kernel on chunks of this many steps, the state carried (None or 0: the whole
    sequence per call). The CUDA backward's scratch is 8 bytes per (b, t, c) of one chunk.
    t_max: the earlier name of chunk_len, still accepted.
    build_dir: where extensions are built (else $RWKV_WKV_BUILD_DIR, else torch's extensions cache).
    """
    if backend not in BACKENDS:
        raise ValueError(f"wkv: unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    k, v, chunk_len = _prepare(time_decay, time_first, k, v, chunk_len, t_max)
    if backend == "reference":
        return wkv_reference(time_decay, time_first, k, v)
    ext = _kernel_for(k, backend, build_dir)
    if ext is None:
        return wkv_reference(time_decay, time_first, k, v)
    if k.shape[1] == 0:
        return torch.empty_like(k)
    return _WKVFunction.apply(time_decay, time_first, k, v, None, ext, chunk_len or k.shape[1])[0]


def wkv_state(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_len: int | None = None,
    build_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV after `state` with gradients: returns (y, state after the last step).

    state: (3, B, C) (aa, bb, pp) as ``initial_state`` makes it (None: an empty history); the output
    state is float32 (float64 for float64 k). Differentiable in time_decay, time_first, k, v and in
    aa, bb of the input state, for gradients arriving at y and at aa, bb of the output state; pp is a
    normaliser and carries none (see the module docstring). Same backends and chunk_len as ``wkv``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"wkv: unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    k, v, chunk_len = _prepare(time_decay, time_first, k, v, chunk_len, None)
    B, T, C = k.shape
    cdt = _compute_dtype(k.dtype)
    if state is not None and state.shape != (3, B, C):
        raise ValueError(f"wkv: state must be (3, {B}, {C}), got {tuple(state.shape)}")
    ext = None if backend == "reference" else _kernel_for(k, backend, build_dir)
    if ext is None or T == 0:
        if state is None:
            state = initial_state(B, C, cdt, k.device)
        return wkv_reference_state(time_decay, time_first, k, v, state)
    if state is not None:
        state = state.to(cdt)
    return _WKVFunction.apply(time_decay, time_first, k, v, state, ext, chunk_len or T)


@torch.no_grad()
def wkv_with_state(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    backend: str = "auto",
    build_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV after a given history, without gradients (inference): returns (y, state after the last step).

    state: (3, B, C) float32 (aa, bb, pp) as ``initial_state`` makes and the ``rwkv`` package keeps it;
    it is not modified. Same backends as ``wkv``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"wkv: unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    k, v, _ = _prepare(time_decay, time_first, k, v, None, None)
    B, _, C = k.shape
    if state.shape != (3, B, C):
        raise ValueError(f"wkv: state must be (3, {B}, {C}), got {tuple(state.shape)}")
    cdt = _compute_dtype(k.dtype)
    w = -torch.exp(time_decay.detach().to(cdt)).contiguous()
    u = time_first.detach().to(cdt).contiguous()
    carried = state.to(cdt).clone()
    ext = None if backend == "reference" else _kernel_for(k, backend, build_dir)
    if ext is None:
        y, carried = _reference_scan(w, u, k.to(cdt), v.to(cdt), carried)
        return y.to(k.dtype), carried.to(state.dtype)
    k, v = k.contiguous(), v.contiguous()
    y = torch.empty_like(k)
    if k.shape[1]:
        with _device_of(k):
            ext.forward(w, u, k, v, y, carried, *_stream_args(k))
    return y, carried.to(state.dtype)
