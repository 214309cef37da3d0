"""RWKV-7 (x070) model: sizes and names, initialisation, RNN mode, and logits against independent
implementations (the `rwkv` inference package with RWKV_V7_ON=1, and the `rwkv7_hf` HF reference)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from train.config import PRESETS, ModelConfig
from train.model import RWKV

ROOT = Path(__file__).resolve().parents[1]
RWKV7_PRESETS = [name for name, p in PRESETS.items() if p.get("arch") == "rwkv7"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small shapes run fastest on one thread, and stay fast when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**overrides) -> ModelConfig:
    """Two heads of 64, LoRA widths 32 (the smallest the released checkpoints use)."""
    values = {"arch": "rwkv7", "n_layer": 3, "n_embd": 128, "vocab_size": 300, "ctx_len": 64}
    values.update(overrides)
    return ModelConfig(**values)


@torch.no_grad()
def perturb7(model: RWKV, seed: int = 0) -> RWKV:
    """Random values in every tensor, scaled so activations stay O(1): a fresh init zeroes the LoRA
    down-projections, att.output and ffn.value, which would hide a swapped or dropped tensor."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        last = name.split(".")[-1]
        if last in ("w1", "a1", "v1", "g1", "w2", "a2", "v2", "g2"):  # x @ W: fan-in is the first dim
            p.copy_(r / math.sqrt(p.shape[0]) * 1.5)
        elif p.dim() == 2 and last == "weight":  # Linear / Embedding weights (out, in)
            p.copy_(r / math.sqrt(p.shape[1]) * 1.5)
        elif last.startswith("x_"):
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        elif last == "w0":
            p.copy_(r - 1.0)
        elif last == "weight":  # LayerNorm / GroupNorm gains
            p.copy_(1.0 + 0.2 * r)
        else:  # biases, a0, v0, k_k, k_a, r_k
            p.copy_(0.5 * r)
    return model


# ------------------------------------------------------------------------------------------ the rwkv package
# Runs in its own process: the package picks its RWKV-7 code path at import time from RWKV_V7_ON.
RWKV_PACKAGE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from rwkv.model import RWKV
    path, out = sys.argv[1], sys.argv[2]
    tokens = [int(t) for t in sys.argv[3].split(",")]
    model = RWKV(model=path, strategy="cpu fp32")
    with torch.no_grad():
        seq_logits, seq_state = model.forward(tokens, None, full_output=True)  # all tokens at once
        state = None
        for t in tokens:  # one token at a time
            one_logits, state = model.forward([t], state)
    torch.save({"seq": seq_logits, "one": one_logits, "state": state}, out)
    """
)


def run_rwkv_package(pth: Path, tokens: list[int], tmp_path: Path) -> dict:
    script = tmp_path / "rwkv_package_x070.py"
    script.write_text(RWKV_PACKAGE_SCRIPT)
    out = tmp_path / "rwkv_package_out.pt"
    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1", "OMP_NUM_THREADS": "1"}
    # The package loads "<model>.pth": it is given the path without the suffix.
    proc = subprocess.run(
        [sys.executable, str(script), str(pth.with_suffix("")), str(out), ",".join(map(str, tokens))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out)


def test_logits_and_state_match_the_rwkv_package(tmp_path):
    """Our state_dict saved as a .pth, unrenamed, loads in `rwkv.model.RWKV` (x070, cpu fp32); its logits
    for every position and its final state (att_x, wkv, ffn_x per layer) match ours in both modes."""
    torch.manual_seed(1)
    model = perturb7(RWKV(small_config()), seed=1).eval()
    pth = tmp_path / "rwkv7-small.pth"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, pth)
    tokens = [5, 17, 250, 3, 99, 42, 7, 0, 299, 128, 64, 5]
    theirs = run_rwkv_package(pth, tokens, tmp_path)
    idx = torch.tensor([tokens])
    with torch.no_grad():
        parallel = model(idx)[0]
        last, state = model.forward_rnn(torch.tensor(tokens))
    assert parallel.abs().max() > 1.0  # the perturbed model is far from the near-zero fresh init
    torch.testing.assert_close(parallel, theirs["seq"].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, theirs["one"].float(), atol=1e-4, rtol=1e-4)
    for ours, their in zip(state.to_rwkv_package(), theirs["state"], strict=True):
        torch.testing.assert_close(ours, their.float(), atol=1e-4, rtol=1e-4)
