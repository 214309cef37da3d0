"""`RWKV(cfg)`: the language model of the architecture `cfg.arch` names (train/models/ holds one module
per generation).

    model = RWKV(ModelConfig.from_preset("rwkv7-0.1b"))   # an instance of train.models.rwkv7.Model
    logits = model(idx)                                    # (B, T) -> (B, T, vocab_size)
    logits, state = model.forward_rnn(tokens, state)       # RNN mode, same logits

Every architecture's model subclasses `RWKV`, so `isinstance(m, RWKV)` holds for all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.config import ModelConfig
from train.models import architecture


class RWKV(nn.Module):
    """Base of every generation's model; `RWKV(cfg)` builds the one `cfg.arch` names.

    What all generations share lives here: the embedding, the blocks (each architecture's `Block`
    class), the output LayerNorm and head, and the initialisation loop that asks the architecture
    for each parameter's value (`_init_value`).
    """

    Block: type[nn.Module]  # set by each architecture: Block(cfg, layer_id)

    def __new__(cls, cfg: ModelConfig, *args: Any, **kwargs: Any):
        if cls is RWKV:
            cls = architecture(cfg.arch).Model
        return super().__new__(cls)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # One draw from the global CPU generator, so torch.manual_seed decides the initial weights;
        # init_weights derives every parameter's own generator from it (see there).
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([self.Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if self.emb.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter set to its architecture's initial value (`_init_value`, which cites the
        formulas).

        Works on parameters partitioned by DeepSpeed ZeRO-3 (`deepspeed.zero.Init`): each one is
        gathered in turn, filled on rank 0 and scattered back, so the whole model is never on one
        rank. The values do not depend on how the model was built: each parameter draws from its
        own generator (seeded from `self.init_seed` and its index), values are computed in fp32
        (vectors in float64 first) and then cast to the parameter's dtype, and no tensor
        constructor that zero.Init patches (torch.empty/zeros/arange/...) is used.
        """
        for index, (name, p) in enumerate(self.named_parameters()):
            with _gathered(p) as writer:
                if writer:
                    p.copy_(self._init_value(name, p, self.init_seed + index))

    def _logits_with_stacked_state(
        self, idx: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of idx (B, T) run through blocks that take and return one state tensor each
        (`block(x, state[i]) -> (x, state)`), per-block gradient checkpointing under grad_cp; the new
        states stacked as `state` is."""
        x = self.emb(idx)
        new_states = []
        for i, block in enumerate(self.blocks):
            if self.cfg.grad_cp and torch.is_grad_enabled():
                x, s = checkpoint(block, x, state[i], use_reentrant=False)
            else:
                x, s = block(x, state[i])
            new_states.append(s)
        return self.head(self.ln_out(x)), torch.stack(new_states)

    def _init_value(self, name: str, p: torch.Tensor, seed: int) -> torch.Tensor:
        """The fp32 initial value of parameter `name` (p: its whole tensor; seed: its generator's)."""
        raise NotImplementedError


def token_shift(x: torch.Tensor, x_prev: torch.Tensor | None = None) -> torch.Tensor:
    """x shifted one step later in time: the previous token's features (zeros, or x_prev, at t=0).

    Same as RWKV-LM's nn.ZeroPad2d((0, 0, 1, -1)) on (B, T, C).
    """
    if x_prev is None:
        return F.pad(x, (0, 0, 1, -1))
    return torch.cat([x_prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


@contextlib.contextmanager
def _gathered(p: nn.Parameter) -> Iterator[bool]:
    """Yield whether this process writes p's initial value: always for an ordinary parameter; for a
    ZeRO-3 partitioned one, p is gathered whole, rank 0 writes, and its value is scattered on exit."""
    if not hasattr(p, "ds_id"):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        yield deepspeed.comm.get_rank() == 0
