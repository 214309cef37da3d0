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


def corpus_text(n_chars: int, shard: str = "00") -> str:
    """The start of the first document of an embedded corpus file, read independently of data_prep."""
    with open(ROOT / f"data/demo/train/{shard}.jsonl.zst", "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read(1 << 20)
    return json.loads(raw.split(b"\n", 1)[0])["text"][:n_chars]
