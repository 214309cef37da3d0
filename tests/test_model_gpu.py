"""The model on a GPU: CUDA kernel in parallel and RNN mode against the CPU twin (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from weights import perturb

from train.config import ModelConfig
from train.model import RWKV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def small_model() -> RWKV:
    torch.manual_seed(0)
    model = RWKV(ModelConfig(n_layer=3, n_embd=64, vocab_size=300, ctx_len=128))
    perturb(model)  # RWKV-LM's init zeroes several matrices; random weights exercise every path
    return model.eval()


@torch.no_grad()
def test_parallel_and_rnn_mode_on_cuda_match_cpu():
    model = small_model()
    idx = torch.randint(0, 300, (2, 96), generator=torch.Generator().manual_seed(1))
    want = model(idx)
    gpu = model.cuda()
    got = gpu(idx.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # RNN mode: the prompt in one call (the kernel with state), then token by token
    logits, state = gpu.forward_rnn(idx[:, :60].cuda())
    for t in range(60, 96):
        logits, state = gpu.forward_rnn(idx[:, t : t + 1].cuda(), state)
    torch.testing.assert_close(logits.cpu(), want[:, -1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_bf16_on_cuda_stays_close_to_fp32():
    model = small_model()
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(2))
    want = model(idx)
    got = model.cuda().bfloat16()(idx.cuda()).float().cpu()
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
