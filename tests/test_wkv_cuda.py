"""The CUDA WKV kernel against the pure-PyTorch reference (needs a CUDA device; skipped without one).

`make gpu-check` runs these on a GPU machine; without CUDA they skip.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils import cpp_extension

from train.wkv import initial_state, load_extension, wkv, wkv_reference, wkv_with_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
    # the kernel is compiled on first use: a GPU without the toolkit cannot run these
    pytest.mark.skipif(cpp_extension.CUDA_HOME is None, reason="no CUDA toolkit (nvcc) to build the kernel"),
]

NAMES = ("time_decay", "time_first", "k", "v")


def inputs_on_cuda(B, T, C, dtype, seed=0, k_scale=10.0):
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.linspace(-5.0, 3.0, C)
    time_first = torch.randn(C, generator=g) * 0.5 - 1.0
    k = (torch.randn(B, T, C, generator=g) * k_scale).clamp(-30, 30)
    k[:, ::7] = 30.0 if dtype != torch.float16 else 8.0
    v = torch.randn(B, T, C, generator=g)
    return [
        x.to("cuda", dtype if x.dim() == 3 else torch.float32).requires_grad_()
        for x in (time_decay, time_first, k, v)
    ]


def rel_err(a, b):
    a, b = a.double(), b.double().to(a.device)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "dtype, T, chunk, tol",
    [
        (torch.float32, 4096, None, 1e-4),
        (torch.bfloat16, 4096, None, 2e-2),
        (torch.float16, 1024, None, 5e-3),
        (torch.float32, 4096, 1000, 1e-4),  # chunked: 5 calls, the last one short, state carried
        (torch.bfloat16, 4096, 1000, 2e-2),
    ],
)
def test_cuda_matches_reference(dtype, T, chunk, tol):
    load_extension("cuda")
    k_scale = 3.0 if dtype == torch.float16 else 10.0
    inputs = inputs_on_cuda(2, T, 128, dtype, k_scale=k_scale)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]  # fp64 reference on the GPU
    gy = torch.randn(2, T, 128, generator=torch.Generator().manual_seed(1)).cuda()
    y = wkv(*inputs, backend="cuda", chunk_len=chunk)
    assert y.dtype == dtype and y.is_cuda
    y_ref = wkv_reference(*ref_inputs)
    assert rel_err(y, y_ref) < tol
    got = torch.autograd.grad(y, inputs, gy.to(dtype))
    want = torch.autograd.grad(y_ref, ref_inputs, gy.double())
    for name, g, g_ref in zip(NAMES, got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, g_ref) < tol, name


def test_cuda_equals_cpu_twin():
    """Same header functions on both sides: fp32 results agree to float rounding."""
    inputs = inputs_on_cuda(2, 300, 96, torch.float32)
    cpu_inputs = [x.detach().cpu() for x in inputs]
    y = wkv(*inputs, backend="cuda", chunk_len=128).cpu()
    torch.testing.assert_close(y, wkv(*cpu_inputs, backend="cpu"), rtol=1e-5, atol=1e-5)


def test_with_state_on_cuda_equals_cpu_twin():
    d, u, k, v = (x.detach() for x in inputs_on_cuda(3, 64, 96, torch.float32))
    s0 = initial_state(3, 96, device="cuda")
    y, s = wkv_with_state(d, u, k, v, s0, backend="cuda")
    y_cpu, s_cpu = wkv_with_state(d.cpu(), u.cpu(), k.cpu(), v.cpu(), s0.cpu(), backend="cpu")
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.cpu(), s_cpu, rtol=1e-5, atol=1e-5)


def test_backward_takes_no_memory_outside_pytorch():
    """The backward's scratch comes from PyTorch's allocator: the driver reserves no per-thread local
    memory for it (a T-long stack array per thread costs GiBs on a large GPU, unseen by PyTorch)."""
    load_extension("cuda")
    torch.cuda.synchronize()

    def outside_torch() -> int:
        free, total = torch.cuda.mem_get_info()
        return (total - free) - torch.cuda.memory_reserved()

    before = outside_torch()
    B, T, C = 8, 4096, 1024
    inputs = inputs_on_cuda(B, T, C, torch.bfloat16)
    y = wkv(*inputs, backend="cuda")
    gy = torch.ones_like(y)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.grad(y, inputs, gy)
    torch.cuda.synchronize()
    grown = outside_torch() - before
    assert grown < 256 * 2**20, f"{grown / 2**30:.2f} GiB of device memory appeared outside PyTorch"
    # What train.estimate counts for the backward's scratch, against what the allocator saw: the peak
    # also holds gk, gv (bf16) and the small per-row gradients.
    from train.config import ModelConfig
    from train.estimate import wkv_scratch_bytes

    scratch = wkv_scratch_bytes(ModelConfig(n_layer=1, n_embd=C, ctx_len=T), T, B)
    extra = torch.cuda.max_memory_allocated() - base
    assert scratch <= extra <= scratch + 2 * 2 * B * T * C + 64 * 2**20, (scratch, extra)


@pytest.mark.parametrize("chunk", [None, 100])
def test_cuda_state_gradients_match_reference(chunk):
    """wkv_state on the CUDA kernel (fp32): y, the output state and every gradient, the input state's
    included, against the fp64 reference's autograd (pp held fixed, see train.wkv)."""
    from train.wkv import wkv_state

    load_extension("cuda")
    B, T, C = 2, 300, 64
    inputs = inputs_on_cuda(B, T + 50, C, torch.float32)
    with torch.no_grad():  # a carried state: the history of 50 earlier steps
        _, s0 = wkv_state(inputs[0], inputs[1], inputs[2][:, :50], inputs[3][:, :50], backend="cuda")
    td, tf, k, v = inputs[0], inputs[1], inputs[2][:, 50:], inputs[3][:, 50:]
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(B, T, C, generator=g).cuda()
    ga, gb = (torch.randn(B, C, generator=g).cuda() for _ in range(2))

    def run(backend, dtype):
        ins = [x.detach().to(dtype).requires_grad_() for x in (td, tf, k, v, s0)]
        y, s = wkv_state(*ins[:4], ins[4], backend=backend, chunk_len=chunk)
        ((y * gy.to(dtype)).sum() + (s[0] * ga.to(dtype)).sum() + (s[1] * gb.to(dtype)).sum()).backward()
        return [y, s[:2]] + [x.grad for x in ins]

    for got, want in zip(run("cuda", torch.float32), run("reference", torch.float64), strict=True):
        assert rel_err(got, want) < 1e-4
