"""`RWKV(cfg)`: the language model of the architecture `cfg.arch` names (train/models/ holds one module
per generation).

    model = RWKV(ModelConfig.from_preset("rwkv7-0.1b"))   # an instance of train.models.rwkv7.Model
    logits = model(idx)                                    # (B, T) -> (B, T, vocab_size)
    logits, state = model.forward_rnn(tokens, state)       # RNN mode, same logits

Every architecture's model subclasses `RWKV`, so `isinstance(m, RWKV)` holds for all of them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from train.config import ModelConfig
from train.models import architecture


class RWKV(nn.Module):
    """Base of every generation's model; `RWKV(cfg)` builds the one `cfg.arch` names."""

    def __new__(cls, cfg: ModelConfig, *args: Any, **kwargs: Any):
        if cls is RWKV:
            cls = architecture(cfg.arch).Model
        return super().__new__(cls)
