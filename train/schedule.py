"""Learning rate as a function of tokens seen: linear warmup, then cosine or exponential decay.

RWKV-LM v4neo decays exponentially by tokens (`lr_init * exp(log(lr_final / lr_init) * progress)`);
cosine is the usual alternative. Measuring progress in tokens rather than steps keeps the schedule
the same when the batch size or the number of processes changes.
"""

from __future__ import annotations

import math


def lr_at(
    tokens: int,
    lr_init: float,
    lr_final: float,
    warmup_tokens: int,
    decay_tokens: int,
    decay: str = "cosine",
) -> float:
    """LR after `tokens` training tokens. Warmup: lr_init * tokens / warmup_tokens; then decay from
    lr_init to lr_final over the next decay_tokens tokens, lr_final afterwards."""
    if warmup_tokens > 0 and tokens < warmup_tokens:
        return lr_init * tokens / warmup_tokens
    if decay == "constant" or decay_tokens <= 0:
        return lr_init
    progress = min(1.0, max(0.0, (tokens - warmup_tokens) / decay_tokens))
    if decay == "cosine":
        return lr_final + 0.5 * (lr_init - lr_final) * (1.0 + math.cos(math.pi * progress))
    if decay == "exponential":
        return lr_init * math.exp(math.log(lr_final / lr_init) * progress)
    raise ValueError(f"unknown LR decay {decay!r} (expected cosine, exponential or constant)")
