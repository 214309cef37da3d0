"""train.estimate: model states against DeepSpeed's estimators, activations against a measurement."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import ModelConfig
from train.estimate import ACT_VALUES_PER_LAYER, deepspeed_model_states, estimate

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["169m", "1b5", "14b"])
@pytest.mark.parametrize("zero,offload", [(2, False), (2, True), (3, False), (3, True)])
@pytest.mark.parametrize("nodes,gpus_per_node", [(1, 8), (8, 8)])
def test_model_states_match_deepspeed(preset, zero, offload, nodes, gpus_per_node):
    mc = ModelConfig.from_preset(preset)
    e = estimate(mc, nodes * gpus_per_node, zero, ctx_len=4096, micro_batch=1, offload=offload)
    ds = deepspeed_model_states(e.n_params, e.largest_layer, zero, gpus_per_node, nodes, offload)
    assert abs(e.model_states - ds) <= 16, (e, ds)


def test_zero_stages_shrink_model_states():
    mc = ModelConfig.from_preset("7b")
    per_stage = [estimate(mc, 64, z, 4096, 1).model_states for z in (0, 1, 2, 3)]
    assert per_stage == sorted(per_stage, reverse=True)
    assert per_stage[0] == 20 * mc.n_params()  # no ZeRO: 2 + 2 + 16 bytes per parameter on every GPU


def test_activation_estimate_against_saved_tensors():
    """Bytes autograd keeps per layer and token (bf16), measured with saved-tensor hooks, are within
    the estimate's tolerance of ACT_VALUES_PER_LAYER * n_embd values."""
    from train.model import RWKV

    D, T, B = 64, 32, 2
    measured = []
    for n_layer in (1, 3):
        mc = ModelConfig.from_preset("tiny", n_layer=n_layer, n_embd=D, vocab_size=128, ctx_len=T)
        model = RWKV(mc).to(torch.bfloat16)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, params=params, seen=seen) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and t.is_floating_point():
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, 128, (B, T)))
        measured.append(sum(seen.values()))
    per_layer_token = (measured[1] - measured[0]) / 2 / (B * T)
    estimated = ACT_VALUES_PER_LAYER * D * 2
    assert 0.6 * estimated <= per_layer_token <= 1.4 * estimated, (per_layer_token, estimated)


def test_cli_prints_breakdown_and_agreement():
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "train.estimate", "--preset", "14b", "--nodes", "8", "--gpus-per-node", "8",
         "--zero", "2", "--ctx-len", "4096", "--micro-batch", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert "14.149 B parameters" in out and "64; ZeRO 2" in out
    labels = ("parameters", "gradients", "optimizer", "activations, no checkpointing", "activations, grad_cp")
    for label in labels:
        assert label in out
    assert "DeepSpeed's estimator" in out and "(agrees" in out
    assert "tokens/s per GPU" in out
