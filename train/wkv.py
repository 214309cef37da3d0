"""The WKV operator of RWKV-4 (time-mixing recurrence), with a pure-PyTorch reference.

Per channel c, with w = -exp(time_decay) and u = time_first:

    y_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (same with v -> 1)

``wkv_reference`` computes it in O(T) with a running maximum exponent, so nothing overflows
for large |k|; autograd differentiates it. ``wkv`` runs the compiled kernels of ``cuda/`` (the CUDA
extension on CUDA tensors, its CPU twin otherwise), both built just in time with ninja and cached.
Sequences longer than the kernel's T_MAX run in chunks, the recurrent state carried across them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable
from torch.utils import cpp_extension

CUDA_SRC_DIR = Path(__file__).resolve().parent.parent / "cuda"
BUILD_DIR_ENV = "RWKV_WKV_BUILD_DIR"
BACKENDS = ("auto", "cuda", "cpu", "reference")

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


class WKVBuildError(RuntimeError):
    """The WKV extension failed to compile; the message carries the compiler's output."""


# Built modules, and failed builds (re-raised rather than retried on every call), by configuration.
_EXTENSIONS: dict[tuple, ModuleType | WKVBuildError] = {}
_BUILD_LOCK = threading.Lock()


def build_extension(
    name: str,
    sources: list[Path | str],
    extra_cflags: list[str] | None = None,
    extra_cuda_cflags: list[str] | None = None,
    extra_ldflags: list[str] | None = None,
    build_dir: str | os.PathLike | None = None,
) -> ModuleType:
    """JIT-build and import a torch extension with ninja; WKVBuildError with the compiler output on failure.

    build_dir: where ninja works; default ``$RWKV_WKV_BUILD_DIR/<name>`` if that is set, else torch's
    extensions cache (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).
    """
    root = build_dir if build_dir is not None else os.environ.get(BUILD_DIR_ENV)
    directory = None
    if root:
        directory = os.path.join(os.fspath(root), name)
        os.makedirs(directory, exist_ok=True)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=extra_cflags,
            extra_cuda_cflags=extra_cuda_cflags,
            extra_ldflags=extra_ldflags,
            extra_include_paths=[str(CUDA_SRC_DIR)],
            build_directory=directory,
            verbose=False,  # keeps the compiler output in the exception instead of on the terminal
        )
    except (RuntimeError, OSError, ImportError) as e:
        where = directory or "torch's extensions directory"
        files = ", ".join(str(s) for s in sources)
        raise WKVBuildError(
            f"building the WKV extension {name!r} from {files} in {where} failed:\n{e}"
        ) from e


# -ffast-math lets gcc call the vectorised expf of glibc (libmvec) in the lane loops; it is a compile
# flag only, so the library is not linked with crtfastmath and the process' float mode is untouched.
CPU_CFLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fopenmp-simd", "-DWKV_OMP_SIMD"]
# As RWKV-LM builds its v4 kernel: fast exp, a register cap that keeps enough threads resident.
CUDA_CFLAGS = ["-O3", "--use_fast_math", "--maxrregcount=60", "-Xptxas=-O3"]


def load_cpu_extension(build_dir: str | os.PathLike | None = None) -> ModuleType:
    """The CPU twin (fp32, bf16 and fp64); no T_MAX bound on the host."""
    key = ("cpu", os.fspath(build_dir) if build_dir else None)
    with _BUILD_LOCK:
        if key not in _EXTENSIONS:
            try:
                _EXTENSIONS[key] = build_extension(
                    "wkv_cpu",
                    [CUDA_SRC_DIR / "wkv_cpu.cpp"],
                    extra_cflags=CPU_CFLAGS,
                    extra_ldflags=["-fopenmp"],
                    build_dir=build_dir,
                )
            except WKVBuildError as e:
                _EXTENSIONS[key] = e
        return _cached(key)


def load_cuda_extension(t_max: int, build_dir: str | os.PathLike | None = None) -> ModuleType:
    """The CUDA kernel (fp32 and bf16 I/O) compiled for sequences of at most t_max steps per call."""
    if t_max <= 0:
        raise ValueError(f"wkv: T_MAX (the model config's ctx_len) must be positive, got {t_max}")
    key = ("cuda", t_max, os.fspath(build_dir) if build_dir else None)
    with _BUILD_LOCK:
        if key not in _EXTENSIONS:
            try:
                _EXTENSIONS[key] = build_extension(
                    f"wkv_cuda_t{t_max}_fp32_bf16",
                    [CUDA_SRC_DIR / "wkv_op.cpp", CUDA_SRC_DIR / "wkv_cuda.cu"],
                    extra_cflags=["-O3", f"-DWKV_T_MAX={t_max}"],
                    extra_cuda_cflags=CUDA_CFLAGS + [f"-DWKV_T_MAX={t_max}"],
                    build_dir=build_dir,
                )
            except WKVBuildError as e:
                _EXTENSIONS[key] = e
        return _cached(key)


def _cached(key: tuple) -> ModuleType:
    entry = _EXTENSIONS[key]
    if isinstance(entry, WKVBuildError):
        raise entry
    return entry


# Chunk length for CUDA when the caller names none (the compiled T_MAX).
DEFAULT_T_MAX = 1024


class _WKVFunction(torch.autograd.Function):
    """Runs an extension's forward/backward chunk by chunk, carrying (aa, bb, pp) and its adjoint."""

    @staticmethod
    def forward(ctx, time_decay, time_first, k, v, ext, chunk):  # type: ignore[override]
        cdt = torch.float64 if k.dtype == torch.float64 else torch.float32
        w = -torch.exp(time_decay.detach().to(cdt)).contiguous()
        u = time_first.detach().to(cdt).contiguous()
        k = k.detach().contiguous()
        v = v.detach().contiguous()
        B, T, C = k.shape
        y = torch.empty_like(k)
        state = _initial_state(B, C, cdt, k.device)
        starts = list(range(0, T, chunk))
        states = torch.empty((len(starts), 3, B, C), dtype=cdt, device=k.device)
        with _device_of(k):
            extra = _stream_args(k)
            for i, t0 in enumerate(starts):
                states[i].copy_(state)
                sl = slice(t0, t0 + chunk)
                ext.forward(w, u, k[:, sl], v[:, sl], y[:, sl], state, *extra)
        ctx.save_for_backward(w, u, k, v, y, states)
        ctx.ext, ctx.chunk = ext, chunk
        ctx.param_dtypes = (time_decay.dtype, time_first.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        w, u, k, v, y, states = ctx.saved_tensors
        ext, chunk = ctx.ext, ctx.chunk
        B, T, C = k.shape
        gy = gy.to(k.dtype).contiguous()
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        gstate = _initial_state(B, C, w.dtype, k.device)
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
        decay_dtype, first_dtype = ctx.param_dtypes
        return gw.sum(0).to(decay_dtype), gu.sum(0).to(first_dtype), gk, gv, None, None


def _device_of(k: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes k's CUDA device current (the binding launches on the current device)."""
    return torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext()


def _stream_args(k: torch.Tensor) -> tuple[int, ...]:
    """The CUDA binding takes the current stream of k's device as an integer handle; the CPU one nothing."""
    if not k.is_cuda:
        return ()
    return (torch.cuda.current_stream(k.device).cuda_stream,)


def _initial_state(B: int, C: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(aa, bb, pp) of an empty history: zero sums, log-scale at 'minus infinity'."""
    state = torch.zeros((3, B, C), dtype=dtype, device=device)
    state[2].fill_(MIN_EXP)
    return state


def wkv(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    t_max: int | None = None,
    build_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """WKV of RWKV-4: time_decay, time_first (C,) as stored; k, v (B, T, C) -> y (B, T, C) of k's dtype.

    backend: "cuda" (CUDA tensors; fp32/bf16), "cpu" (the CPU twin; fp32/bf16/fp64), "reference"
    (pure PyTorch), or "auto": the CUDA extension on CUDA tensors, else the CPU one, falling back to the
    reference with a warning if the extension cannot be built. Differentiable in all four inputs.
    t_max: the kernel's compile-time sequence bound (the model config's ctx_len); longer inputs run in
    chunks of t_max steps with the state carried. On CPU it only sets the chunk length (default: none).
    build_dir: where extensions are built (else $RWKV_WKV_BUILD_DIR, else torch's extensions cache).
    """
    if backend not in BACKENDS:
        raise ValueError(f"wkv: unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    _check_shapes(time_decay, time_first, k, v)
    if k.dtype != v.dtype:  # e.g. one of them produced outside autocast: compute in the wider type
        common = torch.promote_types(k.dtype, v.dtype)
        k, v = k.to(common), v.to(common)
    if t_max is not None and t_max <= 0:
        raise ValueError(f"wkv: t_max (the model config's ctx_len) must be positive, got {t_max}")
    if backend == "reference":
        return wkv_reference(time_decay, time_first, k, v)
    if backend == "cuda" and not k.is_cuda:
        raise ValueError("wkv: backend 'cuda' needs CUDA tensors")
    if backend == "cpu" and k.device.type != "cpu":
        raise ValueError(f"wkv: backend 'cpu' needs CPU tensors, got {k.device}")
    if k.dtype not in (torch.float32, torch.bfloat16, torch.float64) or (
        k.is_cuda and k.dtype == torch.float64
    ):
        if backend != "auto":
            raise ValueError(f"wkv: backend {backend!r} does not take {k.dtype} inputs")
        return wkv_reference(time_decay, time_first, k, v)
    try:
        if k.is_cuda:
            chunk = t_max or DEFAULT_T_MAX
            ext = load_cuda_extension(chunk, build_dir)
        elif k.device.type == "cpu":
            ext = load_cpu_extension(build_dir)
            chunk = t_max or max(k.shape[1], 1)
        else:
            return wkv_reference(time_decay, time_first, k, v)
    except WKVBuildError as e:
        if backend != "auto":
            raise
        warnings.warn(f"wkv: using the slow pure-PyTorch reference because {e}", RuntimeWarning, stacklevel=2)
        return wkv_reference(time_decay, time_first, k, v)
    if k.shape[1] == 0:
        return torch.empty_like(k)
    return _WKVFunction.apply(time_decay, time_first, k, v, ext, chunk)
