"""Training a long window in segments, the recurrent state carried from one segment to the next.

A window of `seq_len` tokens is cut into segments of `ctx_len`; only one segment's activations are
in memory at once. Each segment starts from the state the previous one left (every layer's WKV
state and both token-shift inputs), so the model sees the whole window as one sequence.

- ``bptt="truncated"``: segments run forward and backward in order; the carried state is detached,
  so no gradient crosses a segment boundary (RWKV-infctx-trainer's way).
- ``bptt="full"``: the exact gradient of the whole window. A first pass runs every segment but the
  last without gradients and keeps only the boundary states; then the segments are recomputed with
  gradients in reverse order, each from its boundary state as a leaf. Segment k backpropagates
  ``loss_k + <state_out_k, g_{k+1}>``, where g_{k+1} is the gradient that segment k+1 left on its
  input state, so gradients flow through every boundary: the result equals one-piece training (one
  extra forward per window, like gradient checkpointing; memory: one segment plus the states).

Nothing here knows DeepSpeed: the caller passes the forward (``(idx, state) -> (logits, state)``), the
loss and the backward (e.g. ``engine.backward`` plus a micro-step), and says by how much its backward
scales what it is given (``grad_scale``: 1/gradient_accumulation_steps for DeepSpeed in bf16/fp32), so
the state gradients carried between segments stay in the backward's own units.

A state is a tensor or a NamedTuple (any tuple) of tensors, as the architecture's
``forward_with_state`` returns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

BPTT_MODES = ("full", "truncated")

Forward = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def engine_forward(engine: Any, module: torch.nn.Module) -> Forward:
    """`(idx, state) -> module.forward_with_state(idx, state)`, called through `engine` (a DeepSpeed
    engine, or the module itself): the engine's forward registers the hooks its backward needs, and
    ZeRO-3 gathers parameters in module calls. For the call, the instance's `forward` is the
    architecture's `forward_with_state`, so no model needs a second forward signature."""

    def forward(idx: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        module.forward = module.forward_with_state
        try:
            return engine(idx, state)
        finally:
            del module.forward

    return forward


def segment_slices(seq_len: int, ctx_len: int) -> list[slice]:
    """The segments of a window: ctx_len tokens each (seq_len must be a multiple of ctx_len)."""
    if ctx_len <= 0 or seq_len <= 0 or seq_len % ctx_len:
        raise ValueError(f"seq_len {seq_len} must be a positive multiple of ctx_len {ctx_len}")
    return [slice(t, t + ctx_len) for t in range(0, seq_len, ctx_len)]


def leaves(state: Any) -> list[torch.Tensor]:
    """The tensors of a state (a tensor or a tuple of them)."""
    if state is None:
        return []
    return [state] if torch.is_tensor(state) else list(state)


def rebuild(state: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """A state of the same kind as `state` holding `tensors`."""
    if torch.is_tensor(state):
        return tensors[0]
    cls = type(state)
    return cls(*tensors) if hasattr(cls, "_fields") else cls(tensors)


def detach(state: Any, requires_grad: bool = False) -> Any:
    if state is None:
        return None
    return rebuild(state, [t.detach().requires_grad_(requires_grad) for t in leaves(state)])


def train_window(
    forward: Forward,
    idx: torch.Tensor,
    targets: torch.Tensor,
    ctx_len: int,
    bptt: str,
    loss_fn: LossFn,
    backward: Callable[[torch.Tensor], Any],
    grad_scale: float = 1.0,
    state: Any = None,
) -> list[torch.Tensor]:
    """Forward and backward of one window (idx, targets: (B, seq_len)) in segments of ctx_len.

    forward(idx_segment, state) -> (logits, state after it); state None is a fresh state.
    loss_fn(logits, targets_segment) -> (loss to backpropagate, loss to report), each the segment's mean.
    backward(objective) is called once per segment (in reverse order for bptt="full"); the gradients of
    the parameters it accumulates sum to the gradient of the window's mean loss (the segment losses
    are equal-length means, so a backward that divides by the number of segments, as DeepSpeed's does
    with gradient_accumulation_steps = grad_accum x segments, yields the window mean).
    grad_scale: the factor the backward applies to its objective's gradient (DeepSpeed: 1/GAS).
    state: the state before the window (None: fresh).

    Returns the detached reported losses of the segments, in segment order.
    """
    if bptt not in BPTT_MODES:
        raise ValueError(f"bptt must be one of {', '.join(BPTT_MODES)}, got {bptt!r}")
    segs = segment_slices(idx.shape[1], ctx_len)
    if bptt == "truncated" or len(segs) == 1:
        return _truncated(forward, idx, targets, segs, loss_fn, backward, state)
    return _full(forward, idx, targets, segs, loss_fn, backward, grad_scale, state)


def _truncated(forward, idx, targets, segs, loss_fn, backward, state) -> list[torch.Tensor]:
    reported = []
    state = detach(state)
    for sl in segs:
        logits, state = forward(idx[:, sl], state)
        loss, ce = loss_fn(logits, targets[:, sl])
        backward(loss)
        reported.append(ce.detach())
        state = detach(state)
    return reported


def boundary_states(forward: Forward, idx: torch.Tensor, segs: list[slice], state: Any = None) -> list[Any]:
    """The state before each segment, computed without gradients (the last segment's end is not needed)."""
    states = [detach(state)]
    with torch.no_grad():
        for sl in segs[:-1]:
            _, s = forward(idx[:, sl], states[-1])
            states.append(detach(s))
    return states


def _full(forward, idx, targets, segs, loss_fn, backward, grad_scale, state) -> list[torch.Tensor]:
    states = boundary_states(forward, idx, segs, state)
    reported: list[torch.Tensor] = [torch.empty(())] * len(segs)
    g_next: list[torch.Tensor] | None = None  # d objective / d state_out, in the backward's units
    for k in reversed(range(len(segs))):
        s_in = detach(states[k], requires_grad=k > 0)
        states[k] = None  # the recomputation holds its own reference; keep memory to one segment's worth
        logits, s_out = forward(idx[:, segs[k]], s_in)
        loss, ce = loss_fn(logits, targets[:, segs[k]])
        objective = loss
        if g_next is not None:
            carried = sum((o * g.to(o.dtype)).sum() for o, g in zip(leaves(s_out), g_next, strict=True))
            objective = objective + carried / grad_scale
        backward(objective)
        reported[k] = ce.detach()
        if k > 0:
            g_next = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves(s_in)]
        del logits, s_out, loss, objective, s_in
    return reported
