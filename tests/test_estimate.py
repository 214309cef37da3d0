"""train.estimate: model states against DeepSpeed's estimators, activations against a measurement."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import ModelConfig
from train.estimate import deepspeed_model_states, estimate
from train.models import architecture

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


@pytest.mark.parametrize("preset", ["tiny", "rwkv7-tiny", "rwkv5-tiny", "rwkv6-tiny", "rrwkv-tiny"])
def test_activation_estimate_against_saved_tensors(preset):
    """Bytes autograd keeps per layer and token (bf16), measured with saved-tensor hooks, are within
    the estimate's tolerance of the architecture's activation_values_per_layer."""
    from train.model import RWKV

    D, T, B = 64, 32, 2
    measured = []
    for n_layer in (1, 3):
        mc = ModelConfig.from_preset(preset, n_layer=n_layer, n_embd=D, vocab_size=128, ctx_len=T)
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
    estimated = architecture(mc.arch).activation_values_per_layer(mc) * 2
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


def test_construction_peak_per_rank():
    """Without zero.Init every rank builds the whole fp32 model; under it 1/world (16-bit) plus the
    largest layer gathered for its init. The bench (bench/zero_init.py) checks both against RSS."""
    from train.estimate import construction_bytes, largest_layer_params

    mc = ModelConfig.from_preset("14b")
    P = mc.n_params()
    assert construction_bytes(mc, 64, zero_init=False) == 4 * P
    part = construction_bytes(mc, 64, zero_init=True)
    assert part == 2 * -(-P // 64) + 10 * largest_layer_params(mc)
    assert part < 4 * P / 15


def test_zero12_host_staging_follows_deepspeeds_rule():
    """stage_1_and_2 flattens on the GPU when the flat 16-bit buffer fits beside the parameters,
    else copies every parameter to the host and flattens there (2 x the 16-bit model per rank)."""
    from train.estimate import zero12_host_staging

    mc = ModelConfig.from_preset("14b")
    flat = 2 * mc.n_params()
    assert zero12_host_staging(mc, 80 * 2**30) == 0  # 26 GiB params + 26 GiB buffer fit 80 GB
    assert zero12_host_staging(mc, 40 * 2**30) == 2 * flat


def test_cli_prints_construction_and_host_memory():
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "train.estimate", "--preset", "14b", "--nodes", "8", *a],
        cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    z3 = run("--zero", "3")
    assert "whole model in fp32 (no zero.Init)" in z3 and "52.71 GiB" in z3
    assert "zero.Init (ZeRO-3: 1/world + largest)     2.81 GiB  <- this run" in z3
    assert "host memory per rank" not in z3
    z2 = run("--zero", "2", "--gpu-mem-gib", "40")
    assert "host memory per rank at engine init         52.71 GiB (flat buffer staged on the host)" in z2
    assert "0.00 GiB (flat buffer on the GPU)" in run("--zero", "2")


def test_wkv_scratch_follows_the_chunk_length():
    """The CUDA backward's scratch is 8 bytes per (batch, step, channel) of one chunk."""
    from train.config import ModelConfig
    from train.estimate import main, wkv_scratch_bytes

    whole = ModelConfig.from_preset("1b5")
    chunked = ModelConfig.from_preset("1b5", wkv_chunk_len=1024)
    assert wkv_scratch_bytes(whole, 4096, 8) == 8 * 8 * 4096 * 2048
    assert wkv_scratch_bytes(chunked, 4096, 8) == wkv_scratch_bytes(whole, 4096, 8) // 4
    assert wkv_scratch_bytes(chunked, 512, 8) == 8 * 8 * 512 * 2048  # a chunk longer than the window
    assert main(["--preset", "1b5", "--wkv-chunk-len", "1024"]) == 0
