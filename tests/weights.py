"""Helpers shared by the conversion and generation tests: perturbed weights, real corpus text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import zstandard

from train.model import RWKV

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def perturb(model: RWKV, seed: int = 0) -> RWKV:
    """Random values in every tensor, scaled so activations stay O(1).

    A fresh init zeroes several projections, which would hide a swapped or dropped tensor.
    """
    if model.cfg.arch == "rwkv7":
        return perturb_rwkv7(model, seed)
    if model.cfg.arch in ("rwkv5", "rwkv6"):
        return perturb_rwkv56(model, seed)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.dim() == 2:
            p.copy_(r / math.sqrt(p.shape[1]) * 1.5)
        elif "time_mix" in name:
            p.copy_(torch.rand(p.shape, generator=g))
        elif "time_decay" in name:
            p.copy_(r * 1.5 - 1.0)
        elif "time_first" in name:
            p.copy_(r)
        elif name.endswith("weight"):  # LayerNorm gains
            p.copy_(1.0 + 0.2 * r)
        else:
            p.copy_(0.2 * r)
    return model


@torch.no_grad()
def perturb_rwkv7(model: RWKV, seed: int = 0) -> RWKV:
    """`perturb` for RWKV-7: a fresh init zeroes the LoRA down-projections, att.output and ffn.value,
    which would hide a swapped or dropped tensor."""
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


@torch.no_grad()
def perturb_rwkv56(model: RWKV, seed: int = 0) -> RWKV:
    """`perturb` for RWKV-5/6: a fresh init zeroes att.output, ffn.value, ffn.receptance and the x060
    LoRA down-projections, which would hide a swapped or dropped tensor."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        last = name.split(".")[-1]
        if last.endswith("_w1") or last.endswith("_w2"):  # x @ W: fan-in is the second-to-last dim
            p.copy_(r / math.sqrt(p.shape[-2]) * 1.5)
        elif p.dim() == 2 and last == "weight":  # Linear / Embedding weights (out, in)
            p.copy_(r / math.sqrt(p.shape[1]) * 1.5)
        elif last.startswith("time_mix") or last.startswith("time_maa"):
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        elif last == "time_decay":
            p.copy_(r * 1.5 - 1.0)
        elif last == "time_faaaa":
            p.copy_(r)
        elif last == "weight":  # LayerNorm / GroupNorm gains
            p.copy_(1.0 + 0.2 * r)
        else:  # biases
            p.copy_(0.2 * r)
    return model


def corpus_text(n_chars: int, shard: str = "00") -> str:
    """The start of the first document of an embedded corpus file, read independently of data_prep."""
    with open(ROOT / f"data/demo/train/{shard}.jsonl.zst", "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read(1 << 20)
    return json.loads(raw.split(b"\n", 1)[0])["text"][:n_chars]
