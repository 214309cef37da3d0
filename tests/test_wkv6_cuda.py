"""The WKV-6 CUDA kernel against the fp64 pure-PyTorch reference (needs a CUDA device; skipped without one).

`make gpu-check` runs these on a GPU machine; without CUDA they skip. The fp64 reference runs on the GPU
too, so the whole file takes well under a minute on an H100 once the kernel is built (~1 min, cached).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils import cpp_extension

from train.wkv6 import load_extension, wkv6, wkv6_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
    # the kernel is compiled on first use: a GPU without the toolkit cannot run these
    pytest.mark.skipif(cpp_extension.CUDA_HOME is None, reason="no CUDA toolkit (nvcc) to build the kernel"),
]

NAMES = ("r", "w", "k", "v", "u", "state")


def make_inputs(B, T, H, dtype, seed=0, device="cuda"):
    """r, k, v ~ N(0, 1), w uniform in [-8, 3] (decays ~2e-9 to ~0.9997, see tests/test_wkv6.py),
    u ~ N(0, 0.5^2) in the inputs' dtype, and an fp32 initial state."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, 64)

    def randn(*s):
        return torch.randn(*s, generator=g)

    r, k, v = randn(*shape), randn(*shape), randn(*shape)
    w = -8.0 + 11.0 * torch.rand(*shape, generator=g)
    u = randn(H, 64) * 0.5
    xs = [x.to(device, dtype).requires_grad_() for x in (r, w, k, v, u)]
    s0 = (randn(B, H, 64, 64) * 0.3).to(device).requires_grad_()
    return xs, s0


def fp64_copies(xs, s0):
    """The same (already rounded) values in fp64, on the GPU, for the reference."""
    return [x.detach().double().requires_grad_() for x in (*xs, s0)]


def all_grads(y, s, inputs, gy, gs):
    loss = (y.double() * gy.double()).sum() + (s.double() * gs.double()).sum()
    return torch.autograd.grad(loss, inputs)


def rel_err(a, b):
    a, b = a.double(), b.double().to(a.device)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def cuda_ext():
    return load_extension("cuda")


@pytest.mark.parametrize(
    "dtype, T, tol, gtol",
    [
        (torch.float32, 4096, 1e-4, 2e-4),
        (torch.bfloat16, 4096, 2e-2, 3e-2),
        (torch.float32, 1003, 1e-4, 2e-4),  # not a multiple of 16: the last chunk is short
        (torch.bfloat16, 1003, 2e-2, 3e-2),
    ],
)
def test_cuda_matches_fp64_reference(cuda_ext, dtype, T, tol, gtol):
    """y, final state and all six gradients (u and the state too; a gradient on the final state) at
    B=2, H=4."""
    xs, s0 = make_inputs(2, T, 4, dtype, seed=T)
    ref = fp64_copies(xs, s0)
    y, s = wkv6(*xs, state=s0, backend="cuda")
    assert y.dtype == dtype and y.is_cuda and s.dtype == torch.float32
    y_ref, s_ref = wkv6_reference(*ref[:5], state=ref[5])
    assert rel_err(y, y_ref) < tol, rel_err(y, y_ref)
    assert rel_err(s, s_ref) < tol, rel_err(s, s_ref)
    g = torch.Generator(device="cuda").manual_seed(1)
    gy = torch.randn(y.shape, generator=g, device="cuda").to(dtype)
    gs = torch.randn(s.shape, generator=g, device="cuda")
    got = all_grads(y, s, [*xs, s0], gy, gs)
    want = all_grads(y_ref, s_ref, ref, gy, gs)
    for name, gg, gr in zip(NAMES, got, want, strict=True):
        assert gg.dtype == (torch.float32 if name == "state" else dtype), name
        assert torch.isfinite(gg).all(), name
        assert rel_err(gg, gr) < gtol, (name, rel_err(gg, gr))


def test_cuda_equals_cpu_twin(cuda_ext):
    """Same header functions on both sides: fp32 results agree to float rounding (and fast-math exp)."""
    xs, s0 = make_inputs(2, 300, 3, torch.float32, seed=3)
    cpu = [x.detach().cpu().requires_grad_() for x in (*xs, s0)]
    y, s = wkv6(*xs, state=s0, backend="cuda")
    y_cpu, s_cpu = wkv6(*cpu[:5], state=cpu[5], backend="cpu")
    assert rel_err(y.cpu(), y_cpu) < 1e-5 and rel_err(s.cpu(), s_cpu) < 1e-5
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    gs = torch.randn(s.shape, generator=torch.Generator().manual_seed(5))
    got = all_grads(y, s, [*xs, s0], gy.cuda(), gs.cuda())
    want = all_grads(y_cpu, s_cpu, cpu, gy, gs)
    for name, gg, gc in zip(NAMES, got, want, strict=True):
        assert rel_err(gg.cpu(), gc) < 1e-4, (name, rel_err(gg.cpu(), gc))


@pytest.mark.parametrize("T", [0, 1, 15, 16, 17, 100])
def test_short_and_odd_lengths(cuda_ext, T):
    """Every chunk boundary case against the fp64 reference (T = 0: the state and its gradient pass)."""
    xs, s0 = make_inputs(1, T, 2, torch.float32, seed=10 + T)
    ref = fp64_copies(xs, s0)
    y, s = wkv6(*xs, state=s0, backend="cuda")
    y_ref, s_ref = wkv6_reference(*ref[:5], state=ref[5])
    assert y.shape == y_ref.shape
    if T > 0:
        assert rel_err(y, y_ref) < 1e-4
    assert rel_err(s, s_ref) < 1e-4
    gy, gs = torch.randn(y.shape, device="cuda"), torch.randn(s.shape, device="cuda")
    loss = (y.double() * gy.double()).sum() + (s.double() * gs.double()).sum()
    loss_ref = (y_ref * gy.double()).sum() + (s_ref * gs.double()).sum()
    got = torch.autograd.grad(loss, [*xs, s0], allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(loss_ref, ref, allow_unused=True, materialize_grads=True)
    for name, gg, gr in zip(NAMES, got, want, strict=True):
        if gr.numel():
            assert rel_err(gg, gr) < 2e-4, (name, rel_err(gg, gr))


def test_chained_segments_equal_one_call(cuda_ext):
    """T = 100 as 1 + 16 + 50 + 33 steps with the state passed on equals one call (values, gradients)."""
    xs, s0 = make_inputs(2, 100, 4, torch.float32, seed=6)
    gy = torch.randn(2, 100, 4, 64, device="cuda")
    gs = torch.randn(2, 4, 64, 64, device="cuda")
    y_full, s_full = wkv6(*xs, state=s0, backend="cuda")
    g_full = all_grads(y_full, s_full, [*xs, s0], gy, gs)
    state, ys = s0, []
    for sl in (slice(0, 1), slice(1, 17), slice(17, 67), slice(67, 100)):
        y, state = wkv6(*(x[:, sl] for x in xs[:4]), xs[4], state=state, backend="cuda")
        ys.append(y)
    y_chain = torch.cat(ys, 1)
    assert rel_err(y_chain, y_full) < 1e-5 and rel_err(state, s_full) < 1e-5
    g_chain = all_grads(y_chain, state, [*xs, s0], gy, gs)
    for name, gc, gf in zip(NAMES, g_chain, g_full, strict=True):
        assert rel_err(gc, gf) < 1e-4, (name, rel_err(gc, gf))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_by_token_like_forward_rnn(cuda_ext, dtype):
    """Generation runs T = 1 calls with the state carried: 40 of them equal one T = 40 call."""
    xs, s0 = make_inputs(3, 40, 2, dtype, seed=7)
    with torch.no_grad():
        y_full, s_full = wkv6(*xs, state=s0, backend="cuda")
        state, ys = s0, []
        for t in range(40):
            y, state = wkv6(*(x[:, t : t + 1] for x in xs[:4]), xs[4], state=state, backend="cuda")
            ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_full) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_err(state, s_full) < 1e-5


def test_no_host_sync_and_no_memory_outside_pytorch(cuda_ext):
    """Forward and backward neither synchronise with the host (torch's sync debug mode raises if they
    do) nor take device memory outside PyTorch's allocator (no per-thread local arrays or spills, which
    the driver would reserve for every resident thread)."""
    torch.cuda.synchronize()

    def outside_torch() -> int:
        free, total = torch.cuda.mem_get_info()
        return (total - free) - torch.cuda.memory_reserved()

    before = outside_torch()
    xs, s0 = make_inputs(4, 4096, 16, torch.bfloat16, seed=8)
    gy = torch.ones(4, 4096, 16, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, s = wkv6(*xs, state=s0, backend="cuda")
        grads = torch.autograd.grad((y, s), [*xs, s0], (gy, torch.zeros_like(s)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in grads)
    grown = outside_torch() - before
    assert grown < 256 * 2**20, f"{grown / 2**30:.2f} GiB of device memory appeared outside PyTorch"


def test_auto_on_cuda_runs_the_kernel(cuda_ext):
    xs, s0 = make_inputs(1, 20, 2, torch.float32, seed=9)
    with torch.no_grad():
        y_auto, _ = wkv6(*xs, state=s0)
        y_cuda, _ = wkv6(*xs, state=s0, backend="cuda")
    assert torch.equal(y_auto, y_cuda)
