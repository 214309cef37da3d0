"""WKV operator on CPU: the reference against a direct sum, the compiled CPU twin against the reference.

The CPU extension runs the same functions (cuda/wkv4_math.h) as the CUDA kernel, so these tests check the
kernel math itself: exact fp64 gradcheck, fp32/bf16 accuracy on realistic ranges, chunked = unchunked.
"""

from __future__ import annotations

import pytest
import torch
from machine import cxx_missing

import train.wkv as wkv_mod
from train.wkv import WKVBuildError, initial_state, load_extension, wkv, wkv_reference, wkv_with_state

NAMES = ("time_decay", "time_first", "k", "v")


@pytest.fixture(scope="session")
def cpu_ext():
    """Builds (or loads from the extensions cache) the CPU twin once per session."""
    if cxx_missing() is not None:  # the reference-only tests above still run
        pytest.skip(f"the CPU twin cannot be built: {cxx_missing()}")
    return load_extension("cpu")


def direct_wkv(time_decay, time_first, k, v):
    """The defining formula, summed in O(T^2) without any stabilisation (fp64, moderate values only)."""
    w = -torch.exp(time_decay)
    B, T, C = k.shape
    ys = []
    for t in range(T):
        i = torch.arange(t, dtype=k.dtype)
        weights = torch.exp((t - 1 - i)[None, :, None] * w + k[:, :t])  # (B, t, C)
        now = torch.exp(time_first + k[:, t])
        num = (weights * v[:, :t]).sum(1) + now * v[:, t]
        den = weights.sum(1) + now
        ys.append(num / den)
    return torch.stack(ys, 1)


def realistic_inputs(B, T, C, dtype, seed=0, k_scale=10.0, requires_grad=True):
    """time_decay spans RWKV-4's initial range (w from about -0.007 to -20), k reaches +-30."""
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.linspace(-5.0, 3.0, C, dtype=torch.float64)
    time_first = torch.randn(C, generator=g, dtype=torch.float64) * 0.5 - 1.0
    k = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * k_scale).clamp(-30, 30)
    k[:, ::7] = 30.0  # runs of extreme keys: the running maximum must absorb them
    k[:, 3::11] = -30.0
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    out = [time_decay, time_first, k.to(dtype), v.to(dtype)]
    return [x.detach().requires_grad_(requires_grad) for x in out]


def grads(y, inputs, gy):
    return torch.autograd.grad(y, inputs, gy)


def rel_err(a, b):
    """Max abs error relative to the reference's largest magnitude."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_reference_matches_direct_sum():
    inputs = realistic_inputs(2, 12, 5, torch.float64, k_scale=2.0)
    with torch.no_grad():
        inputs[2].clamp_(-5, 5)  # the unstabilised sum overflows at +-30; keep it honest here
        y_ref = wkv_reference(*inputs)
        y_direct = direct_wkv(*inputs)
    torch.testing.assert_close(y_ref, y_direct, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    inputs = realistic_inputs(2, 6, 3, torch.float64, k_scale=3.0)
    assert torch.autograd.gradcheck(wkv_reference, inputs)


@pytest.mark.parametrize("chunk", [None, 4])
def test_cpu_extension_gradcheck(cpu_ext, chunk):
    """Exact analytic gradients of the kernel, including the state carried across chunks (T=9 > 4)."""
    inputs = realistic_inputs(2, 9, 3, torch.float64, k_scale=3.0)
    fn = lambda d, u, k, v: wkv(d, u, k, v, backend="cpu", chunk_len=chunk)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_cpu_extension_gradcheck_lane_blocks(cpu_ext):
    """C = 67: one vectorised block of 64 channels plus 3 leftover channels, both code paths."""
    inputs = realistic_inputs(1, 5, 67, torch.float64, k_scale=3.0)
    fn = lambda d, u, k, v: wkv(d, u, k, v, backend="cpu", chunk_len=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_fp32_matches_reference_long_sequence(cpu_ext):
    """fp32 kernel vs the fp64 reference on T = 1024, k in [-30, 30]: y to 1e-4, gradients to 1e-4 relative.

    (The fp32 reference itself is off by about 4e-5 in y and 1e-5 relative in the gradients here.)
    """
    inputs = realistic_inputs(2, 1024, 80, torch.float32)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    gy = torch.randn(2, 1024, 80, generator=torch.Generator().manual_seed(1))
    y = wkv(*inputs, backend="cpu")
    y_ref = wkv_reference(*ref_inputs)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert (y.double() - y_ref).abs().max().item() < 1e-4
    got, want = grads(y, inputs, gy), grads(y_ref, ref_inputs, gy.double())
    for name, g, g_ref in zip(NAMES, got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, g_ref) < 1e-4, name


def test_bf16_matches_reference(cpu_ext):
    """bf16 in, bf16 out, fp32 inside: within bf16 rounding of the fp64 reference on the same inputs."""
    inputs = realistic_inputs(2, 256, 80, torch.bfloat16)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    gy = torch.randn(2, 256, 80, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = wkv(*inputs, backend="cpu")
    y_ref = wkv_reference(*ref_inputs)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 1e-2
    got = grads(y, inputs, gy)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    for name, g, g_ref in zip(NAMES, got, grads(y_ref, ref_inputs, gy.double()), strict=True):
        assert rel_err(g, g_ref) < 2e-2, name


def test_chunked_equals_unchunked(cpu_ext):
    """T = 300 in chunks of 64 / 100 / 299 equals one pass: forward bit-exact, gradients to rounding."""
    inputs = realistic_inputs(2, 300, 80, torch.float32)
    gy = torch.randn(2, 300, 80, generator=torch.Generator().manual_seed(3))
    y_full = wkv(*inputs, backend="cpu")
    g_full = grads(y_full, inputs, gy)
    for chunk in (64, 100, 299):
        y = wkv(*inputs, backend="cpu", chunk_len=chunk)
        assert torch.equal(y, y_full), chunk
        for name, g, g0 in zip(NAMES, grads(y, inputs, gy), g_full, strict=True):
            assert rel_err(g, g0) < 1e-5, (chunk, name)
    # the earlier keyword still works
    assert torch.equal(wkv(*inputs, backend="cpu", t_max=64), y_full)


def test_auto_on_cpu_uses_the_extension(cpu_ext):
    inputs = realistic_inputs(1, 40, 16, torch.float32, requires_grad=False)
    assert torch.equal(wkv(*inputs), wkv(*inputs, backend="cpu"))
    assert torch.equal(wkv(*inputs, backend="reference"), wkv_reference(*inputs))


def test_non_contiguous_inputs(cpu_ext):
    d, u, k, v = realistic_inputs(2, 30, 16, torch.float32, requires_grad=False)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, C, T) memory order
    assert not k_t.is_contiguous()
    torch.testing.assert_close(wkv(d, u, k_t, v, backend="cpu"), wkv_reference(d, u, k, v), rtol=0, atol=2e-5)


def test_mixed_k_v_dtypes_are_promoted(cpu_ext):
    d, u, k, v = realistic_inputs(1, 20, 16, torch.float32, requires_grad=False)
    y = wkv(d, u, k.bfloat16(), v, backend="cpu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, wkv_reference(d, u, k.bfloat16().float(), v), rtol=0, atol=2e-5)


def test_loading_keeps_denormals(cpu_ext):
    """The extension is compiled with -ffast-math; loading it must not switch the process to flush-to-zero."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 0.5).item() != 0.0


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((4,), (4,), (2, 3, 4), (2, 3, 5)), "k and v"),
        (((4,), (4,), (3, 4), (3, 4)), "k and v"),
        (((5,), (4,), (2, 3, 4), (2, 3, 4)), "time_decay and time_first"),
    ],
)
def test_bad_shapes_are_refused(shapes, match):
    tensors = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        wkv(*tensors)


def test_bad_arguments_are_refused():
    d, u, k, v = realistic_inputs(1, 4, 4, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="unknown backend"):
        wkv(d, u, k, v, backend="triton")
    with pytest.raises(ValueError, match="chunk_len must be positive"):
        wkv(d, u, k, v, chunk_len=-1)
    with pytest.raises(ValueError, match="CUDA tensors"):
        wkv(d, u, k, v, backend="cuda")


def test_fp16_matches_reference(cpu_ext):
    """fp16 in and out (the CUDA kernel's V100 path), fp32 inside: within fp16 rounding of the reference."""
    inputs = realistic_inputs(2, 128, 72, torch.float16, k_scale=3.0)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    gy = torch.randn(2, 128, 72, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    y = wkv(*inputs, backend="cpu")
    y_ref = wkv_reference(*ref_inputs)
    assert y.dtype == torch.float16
    assert rel_err(y, y_ref) < 2e-3
    want = grads(y_ref, ref_inputs, gy.double())
    for name, g, g_ref in zip(NAMES, grads(y, inputs, gy), want, strict=True):
        assert rel_err(g, g_ref) < 5e-3, name


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_with_state_carries_history(cpu_ext, backend):
    """Three calls with the state carried give the one-pass output and the reference's final state."""
    d, u, k, v = realistic_inputs(2, 90, 24, torch.float32, requires_grad=False)
    y_full = wkv_reference(d, u, k, v)
    state = initial_state(2, 24)
    start = state.clone()
    parts = []
    for sl in (slice(0, 1), slice(1, 50), slice(50, 90)):
        y, state = wkv_with_state(d, u, k[:, sl], v[:, sl], state, backend=backend)
        parts.append(y)
    assert torch.equal(start, initial_state(2, 24))  # the caller's state is not modified
    torch.testing.assert_close(torch.cat(parts, 1), y_full, rtol=0, atol=2e-5)
    # the final state, from an independent computation: the reference loop over the whole sequence
    _, ref_state = wkv_mod._reference_scan(-torch.exp(d.float()), u.float(), k, v, initial_state(2, 24))
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)


class _FakeCudaTensor:
    """Stands in for a CUDA tensor where _kernel_for only asks for device and dtype."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, dtype):
        self.dtype = dtype


def test_auto_never_falls_back_to_the_reference_on_cuda(monkeypatch):
    """On a GPU, auto means the CUDA kernel: a failed build is an error, not a slow Python loop."""
    def broken(kind, build_dir=None):
        raise WKVBuildError(f"wkv-build-marker: {kind} build broken on purpose")

    monkeypatch.setattr(wkv_mod, "load_extension", broken)
    with pytest.raises(WKVBuildError, match="cuda build broken"):
        wkv_mod._kernel_for(_FakeCudaTensor(torch.bfloat16), "auto", None)
    with pytest.raises(ValueError, match="cuda kernel takes .* got torch.float64"):
        wkv_mod._kernel_for(_FakeCudaTensor(torch.float64), "auto", None)
    # on the CPU, auto still degrades (with a warning) so a machine without a compiler can run
    with pytest.warns(RuntimeWarning, match="cpu build broken"):
        assert wkv_mod._kernel_for(torch.zeros(1, 1, 1), "auto", None) is None
