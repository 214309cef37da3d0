"""WKV-6 on CPU: the reference against an independent numpy loop, the CPU twin against the reference.

The CPU twin runs the same workers (cuda/wkv6_math.h) as the CUDA kernel, so these tests check the kernel
math itself: fp64 gradcheck of all six inputs (u and the initial state included), fp64/fp32/bf16 against
the fp64 reference for decays from ~0 to ~1, any T (checkpoints every 16 steps), chaining segments
through the state, and the argument checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from machine import cxx_missing

import train.wkv6 as wkv6_mod
from train.wkv6 import WKVBuildError, load_extension, wkv6, wkv6_reference

NAMES = ("r", "w", "k", "v", "u", "state")


@pytest.fixture(scope="session")
def cpu_ext():
    """Builds (or loads from the extensions cache) the CPU twin once per session."""
    if cxx_missing() is not None:
        pytest.skip(f"the CPU twin cannot be built: {cxx_missing()}")
    return load_extension("cpu")


def make_inputs(B, T, H, dtype, N=64, seed=0, state=True, requires_grad=True, w_range=(-8.0, 3.0)):
    """r, k, v ~ N(0, 1); w uniform in w_range, so decays exp(-exp(w)) span ~2e-9 (w = 3, as RWKV-6's
    trained decays reach) to ~0.9997 (w = -8); u ~ N(0, 0.5^2); a small initial state (or None).
    Returns [r, w, k, v, u] and the state."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shape = (B, T, H, N)
    r, k, v = randn(*shape), randn(*shape), randn(*shape)
    lo, hi = w_range
    w = lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)
    u = randn(H, N) * 0.5
    xs = [x.to(dtype).requires_grad_(requires_grad) for x in (r, w, k, v, u)]
    s0 = None
    if state:
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        s0 = (randn(B, H, N, N) * 0.3).to(sdt).requires_grad_(requires_grad)
    return xs, s0


def loop_wkv6(r, w, k, v, u, state=None):
    """The defining formula, one (batch, head) at a time, in numpy fp64 (no torch, no einsum):
    y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1}),  S_t = diag(d_t) S_{t-1} + k_t v_t^T."""
    r, w, k, v, u = (x.detach().double().numpy() for x in (r, w, k, v, u))
    B, T, H, N = r.shape
    y = np.zeros((B, T, H, N))
    s_out = np.zeros((B, H, N, N))
    for bb in range(B):
        for h in range(H):
            s = np.zeros((N, N)) if state is None else state[bb, h].detach().double().numpy().copy()
            for t in range(T):
                kv = np.outer(k[bb, t, h], v[bb, t, h])
                y[bb, t, h] = r[bb, t, h] @ (np.diag(u[h]) @ kv + s)
                s = np.diag(np.exp(-np.exp(w[bb, t, h]))) @ s + kv
            s_out[bb, h] = s
    return torch.from_numpy(y), torch.from_numpy(s_out)


def all_grads(y, s, inputs, gy, gs):
    """Gradients of <y, gy> + <s, gs> (a gradient on the final state too) w.r.t. inputs (zeros where an
    input does not reach the outputs: u and r at T = 0)."""
    loss = (y.double() * gy.double()).sum() + (s.double() * gs.double()).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def rel_err(a, b):
    """Max abs error relative to the reference's largest magnitude (0 for empty tensors)."""
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def as_reference_inputs(xs, s0):
    """fp64 leaf copies of the inputs (and state), for the reference."""
    ref_xs = [x.detach().double().requires_grad_() for x in xs]
    ref_s0 = None if s0 is None else s0.detach().double().requires_grad_()
    return ref_xs, ref_s0


# ---- the reference ----


@pytest.mark.parametrize("with_state", [False, True])
def test_reference_matches_numpy_loop(with_state):
    xs, s0 = make_inputs(2, 13, 2, torch.float64, N=8, state=with_state, requires_grad=False)
    y, s = wkv6_reference(*xs, state=s0)
    y_loop, s_loop = loop_wkv6(*xs, state=s0)
    torch.testing.assert_close(y, y_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_loop, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    xs, s0 = make_inputs(1, 5, 2, torch.float64, N=4)
    assert torch.autograd.gradcheck(lambda *args: wkv6_reference(*args[:5], state=args[5]), (*xs, s0))


# ---- the CPU twin against the reference ----


@pytest.mark.parametrize("T", [1, 5, 20])
def test_cpu_twin_gradcheck(cpu_ext, T):
    """Exact analytic gradients of the kernel math in all six inputs (u and the initial state included),
    with a gradient on the final state too; T = 20 crosses a checkpoint (16) and ends mid-chunk."""
    xs, s0 = make_inputs(1, T, 1, torch.float64, seed=T)
    fn = lambda *args: wkv6(*args[:5], state=args[5], backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*xs, s0), fast_mode=True)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float64, 1e-10), (torch.float32, 1e-4)],
)
@pytest.mark.parametrize("T", [0, 1, 15, 16, 17, 100])
def test_cpu_twin_matches_reference(cpu_ext, T, dtype, tol, with_state):
    """y, final state and every gradient (u and the initial state included; a gradient on the final
    state too) against the fp64 reference on the same inputs, decays from ~2e-9 to ~0.9997."""
    xs, s0 = make_inputs(2, T, 2, dtype, seed=T, state=with_state)
    ref_xs, ref_s0 = as_reference_inputs(xs, s0)
    y, s = wkv6(*xs, state=s0, backend="cpu")
    y_ref, s_ref = wkv6_reference(*ref_xs, state=ref_s0)
    assert y.dtype == dtype and s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert y.shape == (2, T, 2, 64) and s.shape == (2, 2, 64, 64)
    assert rel_err(y, y_ref) < tol and rel_err(s, s_ref) < tol
    if T == 0 and not with_state:  # nothing reaches the outputs: no graph to differentiate
        assert not y.requires_grad and not s.requires_grad and not s.any()
        return
    g = torch.Generator().manual_seed(100 + T)
    gy, gs = torch.randn(y.shape, generator=g), torch.randn(s.shape, generator=g)
    inputs, ref_inputs = [*xs], [*ref_xs]
    if with_state:
        inputs.append(s0)
        ref_inputs.append(ref_s0)
    got = all_grads(y, s, inputs, gy, gs)
    want = all_grads(y_ref, s_ref, ref_inputs, gy, gs)
    for name, gg, gr in zip(NAMES, got, want, strict=False):
        assert gg.dtype == (dtype if name != "state" else s0.dtype), name
        assert torch.isfinite(gg).all(), name
        assert rel_err(gg, gr) < tol, (name, rel_err(gg, gr))


@pytest.mark.parametrize("T", [1, 17, 100])
def test_bf16_matches_reference(cpu_ext, T):
    """bf16 in and out (u too), fp32 inside: within bf16 rounding of the fp64 reference on the same inputs."""
    xs, s0 = make_inputs(2, T, 2, torch.bfloat16, seed=T)
    ref_xs, ref_s0 = as_reference_inputs(xs, s0)
    y, s = wkv6(*xs, state=s0, backend="cpu")
    y_ref, s_ref = wkv6_reference(*ref_xs, state=ref_s0)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-2 and rel_err(s, s_ref) < 1e-4
    g = torch.Generator().manual_seed(7)
    gy, gs = torch.randn(y.shape, generator=g).bfloat16(), torch.randn(s.shape, generator=g)
    got = all_grads(y, s, [*xs, s0], gy, gs)
    want = all_grads(y_ref, s_ref, [*ref_xs, ref_s0], gy, gs)
    for name, gg, gr in zip(NAMES, got, want, strict=True):
        assert gg.dtype == (torch.bfloat16 if name != "state" else torch.float32), name
        assert rel_err(gg, gr) < 2e-2, (name, rel_err(gg, gr))


@pytest.mark.parametrize(
    "dtype, w_value, tol",
    [(torch.float32, 3.0, 1e-4), (torch.float32, -12.0, 1e-4), (torch.float64, 50.0, 1e-10)],
)
def test_decay_at_the_edges(cpu_ext, dtype, w_value, tol):
    """The backward never divides by the decay: the same decay on every channel and step, near 0
    (w = 3: d ~ 2e-9), near 1 (w = -12: d ~ 1 - 6e-6) and exactly 0 in fp64 (w = 50), gives gradients as
    accurate as the model-range inputs, over several chunks."""
    xs, s0 = make_inputs(1, 40, 2, dtype, seed=3, requires_grad=False)
    xs[1] = torch.full_like(xs[1], w_value)
    xs = [x.requires_grad_() for x in xs]
    s0.requires_grad_()
    ref_xs, ref_s0 = as_reference_inputs(xs, s0)
    y, s = wkv6(*xs, state=s0, backend="cpu")
    y_ref, s_ref = wkv6_reference(*ref_xs, state=ref_s0)
    assert rel_err(y, y_ref) < tol and rel_err(s, s_ref) < tol
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    gs = torch.randn(s.shape, generator=torch.Generator().manual_seed(2))
    got = all_grads(y, s, [*xs, s0], gy, gs)
    want = all_grads(y_ref, s_ref, [*ref_xs, ref_s0], gy, gs)
    for name, gg, gr in zip(NAMES, got, want, strict=True):
        assert torch.isfinite(gg).all(), name
        if name == "w" and w_value == 50.0:  # dd/dw = -exp(w - exp(w)) is exactly 0 there
            assert not gg.any() and not gr.any()
            continue
        assert rel_err(gg, gr) < tol, (w_value, name, rel_err(gg, gr))


def test_empty_sequence(cpu_ext):
    """T = 0: empty y, the state passes through, and so does its gradient."""
    xs, s0 = make_inputs(2, 0, 2, torch.float32)
    y, s = wkv6(*xs, state=s0, backend="cpu")
    assert y.shape == (2, 0, 2, 64)
    assert torch.equal(s, s0.detach())
    (gs0,) = torch.autograd.grad(s.sum(), [s0])
    assert torch.equal(gs0, torch.ones_like(s0))
    y, s = wkv6(*xs, backend="cpu")
    assert torch.equal(s, torch.zeros(2, 2, 64, 64))


def test_chained_segments_equal_one_call(cpu_ext):
    """Running T = 40 as 1 + 16 + 23 steps with the state passed on equals one call: values and all
    gradients (u's sums the segments' contributions; the gradient reaches the earlier segments through
    the carried state)."""
    xs, s0 = make_inputs(2, 40, 2, torch.float32)
    gy = torch.randn(2, 40, 2, 64, generator=torch.Generator().manual_seed(5))
    gs = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(6))
    y_full, s_full = wkv6(*xs, state=s0, backend="cpu")
    g_full = all_grads(y_full, s_full, [*xs, s0], gy, gs)

    state, ys = s0, []
    for sl in (slice(0, 1), slice(1, 17), slice(17, 40)):
        y, state = wkv6(*(x[:, sl] for x in xs[:4]), xs[4], state=state, backend="cpu")
        ys.append(y)
    y_chain = torch.cat(ys, 1)
    torch.testing.assert_close(y_chain, y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_full, rtol=1e-5, atol=1e-5)
    g_chain = all_grads(y_chain, state, [*xs, s0], gy, gs)
    for name, gc, gf in zip(NAMES, g_chain, g_full, strict=True):
        assert rel_err(gc, gf) < 1e-5, name


def test_only_one_output_used(cpu_ext):
    """Backward with a gradient on y only, and on the final state only (the other is None to autograd)."""
    xs, s0 = make_inputs(1, 20, 1, torch.float64)
    ref = [x.detach().requires_grad_() for x in (*xs, s0)]
    y, s = wkv6(*xs, state=s0, backend="cpu")
    y_ref, s_ref = wkv6_reference(*ref[:5], state=ref[5])
    for out, out_ref in ((y, y_ref), (s, s_ref)):
        got = torch.autograd.grad(out.sum(), [*xs, s0], retain_graph=True)
        # (S_T depends on neither r nor u: the reference has no gradient there, the kernel a zero one)
        want = torch.autograd.grad(out_ref.sum(), ref, retain_graph=True, allow_unused=True,
                                   materialize_grads=True)
        for name, gg, gr in zip(NAMES, got, want, strict=True):
            assert rel_err(gg, gr) < 1e-10, name


def test_auto_on_cpu_uses_the_twin(cpu_ext):
    xs, s0 = make_inputs(1, 20, 2, torch.float32, requires_grad=False)
    y, s = wkv6(*xs, state=s0)
    y_cpu, s_cpu = wkv6(*xs, state=s0, backend="cpu")
    assert torch.equal(y, y_cpu) and torch.equal(s, s_cpu)
    y_ref, _ = wkv6(*xs, state=s0, backend="reference")
    assert torch.equal(y_ref, wkv6_reference(*xs, state=s0)[0])
    assert not torch.equal(y_ref, y)  # a different computation: the twin did run


def test_other_head_sizes_run_the_reference_under_auto(cpu_ext):
    xs, s0 = make_inputs(1, 6, 2, torch.float32, N=16, requires_grad=False)
    with pytest.warns(RuntimeWarning, match="head size N = 64"):
        y, _ = wkv6(*xs, state=s0)
    assert torch.equal(y, wkv6_reference(*xs, state=s0)[0])
    with pytest.raises(ValueError, match="head size N = 64, got N = 16"):
        wkv6(*xs, state=s0, backend="cpu")


# ---- argument checks ----


def _zeros(shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"k": _zeros((2, 3, 2, 32))}, r"k has shape \(2, 3, 2, 32\), r has \(2, 3, 2, 64\)"),
        ({"r": _zeros((2, 3, 64))}, r"r must be \(B, T, H, N\)"),
        ({"v": _zeros((2, 3, 2, 64), torch.bfloat16)}, "v is torch.bfloat16, r is torch.float32"),
        ({"u": _zeros((2, 32))}, r"u must be \(2, 64\); got \(2, 32\)"),
        ({"u": _zeros((2, 64), torch.int64)}, "u must be a floating-point tensor"),
        ({"state": _zeros((2, 2, 64, 32))}, r"state must be \(2, 2, 64, 64\); got \(2, 2, 64, 32\)"),
        ({"state": _zeros((2, 2, 64, 64), torch.int64)}, "state must be a floating-point tensor"),
        ({"backend": "triton"}, "unknown backend 'triton'"),
        ({"backend": "cuda"}, "backend 'cuda' needs CUDA tensors"),
    ],
)
def test_bad_arguments_are_refused(change, match):
    args = {n: _zeros((2, 3, 2, 64)) for n in ("r", "w", "k", "v")}
    args["u"] = _zeros((2, 64))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        wkv6(**args)
    if "backend" not in change:  # the reference checks the same things
        with pytest.raises(ValueError, match=match):
            wkv6_reference(**args)


def test_integer_inputs_are_refused():
    args = [torch.zeros((1, 2, 1, 64), dtype=torch.int32) for _ in range(4)]
    with pytest.raises(ValueError, match="floating point"):
        wkv6(*args, torch.zeros(1, 64))


# ---- backend choice and build failures ----

BROKEN_SOURCE = "#error wkv6-build-marker: this source is broken on purpose\n"


@pytest.mark.skipif(cxx_missing() is not None, reason=str(cxx_missing()))
def test_failed_build_raises_for_cpu_and_warns_under_auto(tmp_path, monkeypatch):
    """A broken CPU twin: backend='cpu' raises with the compiler output; 'auto' warns, runs the reference."""
    broken_dir = tmp_path / "cuda"
    broken_dir.mkdir()
    (broken_dir / "wkv6_cpu.cpp").write_text(BROKEN_SOURCE)
    monkeypatch.setattr(wkv6_mod, "CUDA_SRC_DIR", broken_dir)
    build_dir = tmp_path / "build"
    xs, s0 = make_inputs(1, 4, 1, torch.float32, requires_grad=False)
    with pytest.raises(WKVBuildError, match="wkv6-build-marker"):
        wkv6(*xs, state=s0, backend="cpu", build_dir=build_dir)
    with pytest.warns(RuntimeWarning, match="wkv6-build-marker"):
        y, s = wkv6(*xs, state=s0, backend="auto", build_dir=build_dir)
    y_ref, s_ref = wkv6_reference(*xs, state=s0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


class _FakeCudaTensor:
    """Stands in for a CUDA tensor where _kernel_for only asks for device, dtype and shape."""

    is_cuda = True
    device = torch.device("cuda", 0)
    shape = (1, 1, 1, 64)

    def __init__(self, dtype):
        self.dtype = dtype


def test_auto_never_falls_back_to_the_reference_on_cuda(monkeypatch):
    """On a GPU, auto means the CUDA kernel: a failed build or an unsupported dtype is an error."""

    def broken(kind, build_dir=None):
        raise WKVBuildError(f"wkv6-build-marker: {kind} build broken on purpose")

    monkeypatch.setattr(wkv6_mod, "load_extension", broken)
    with pytest.raises(WKVBuildError, match="cuda build broken"):
        wkv6_mod._kernel_for(_FakeCudaTensor(torch.bfloat16), "auto", None)
    with pytest.raises(ValueError, match="cuda kernel takes .* got torch.float64"):
        wkv6_mod._kernel_for(_FakeCudaTensor(torch.float64), "auto", None)
    with pytest.warns(RuntimeWarning, match="cpu build broken"):
        assert wkv6_mod._kernel_for(torch.zeros(1, 1, 1, 64), "auto", None) is None
