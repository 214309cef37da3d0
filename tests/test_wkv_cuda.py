"""The CUDA WKV kernel against the pure-PyTorch reference (needs a CUDA device; skipped without one)."""

from __future__ import annotations

import pytest
import torch
from torch.utils import cpp_extension

from train.wkv import load_cuda_extension, wkv, wkv_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
    # the kernel is compiled on first use: a GPU without the toolkit cannot run these
    pytest.mark.skipif(cpp_extension.CUDA_HOME is None, reason="no CUDA toolkit (nvcc) to build the kernel"),
]

NAMES = ("time_decay", "time_first", "k", "v")


def inputs_on_cuda(B, T, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.linspace(-5.0, 3.0, C)
    time_first = torch.randn(C, generator=g) * 0.5 - 1.0
    k = (torch.randn(B, T, C, generator=g) * 10).clamp(-30, 30)
    k[:, ::7] = 30.0
    v = torch.randn(B, T, C, generator=g)
    return [
        x.to("cuda", dtype if x.dim() == 3 else torch.float32).requires_grad_()
        for x in (time_decay, time_first, k, v)
    ]


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("t_max", [1024, 128])  # 128: T = 1024 runs in 8 chunks with the state carried
def test_cuda_matches_reference(dtype, tol, t_max):
    load_cuda_extension(t_max)
    inputs = inputs_on_cuda(4, 1024, 256, dtype)
    ref_inputs = [x.detach().cpu().double().requires_grad_() for x in inputs]
    gy = torch.randn(4, 1024, 256, generator=torch.Generator().manual_seed(1))
    y = wkv(*inputs, backend="cuda", t_max=t_max)
    assert y.dtype == dtype and y.is_cuda
    y_ref = wkv_reference(*ref_inputs)
    assert rel_err(y, y_ref) < tol
    got = torch.autograd.grad(y, inputs, gy.to("cuda", dtype))
    want = torch.autograd.grad(y_ref, ref_inputs, gy.double())
    for name, g, g_ref in zip(NAMES, got, want, strict=True):
        assert rel_err(g, g_ref) < tol, name


def test_cuda_equals_cpu_twin():
    """Same header functions on both sides: fp32 results agree to float rounding."""
    inputs = inputs_on_cuda(2, 300, 96, torch.float32)
    cpu_inputs = [x.detach().cpu() for x in inputs]
    torch.testing.assert_close(
        wkv(*inputs, backend="cuda", t_max=128).cpu(), wkv(*cpu_inputs, backend="cpu"), rtol=1e-5, atol=1e-5
    )
