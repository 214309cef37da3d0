"""Sample text from trained weights, or score a text file, with our RWKV model.

    python -m launch.generate --weights PATH --prompt "ROMEO." [--max-tokens 200]
                              [--temperature 1.0] [--top-p 0.85] [--seed 0] [--tokenizer SPEC]
    python -m launch.generate --weights PATH --score FILE [--tokenizer SPEC]

PATH: an fp32 state dict or rwkv ``.pth`` (from ``launch.convert``), a Hugging
Face directory from ``launch.convert --to hf``, or a DeepSpeed checkpoint
directory.  Generation runs the model in RNN mode (``forward_rnn``): the prompt
once, then one token at a time.  Scoring runs the parallel mode over windows of
``ctx_len`` tokens, each window starting from a fresh state.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_prep.output_paths import OutputPathError, check_writable_file
from launch.checkpoint_io import CheckpointError, find_tokenizer_spec
from launch.model_loading import load_model
from train.model import RWKV


def sample_logits(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from logits (V,) by temperature and nucleus (top-p) sampling.

    Exactly one uniform draw per call (inverse CDF over the probability-sorted
    vocabulary), so a seed fixes the whole sequence and the same draw can be
    replayed against other logits.  temperature 0 is greedy (still one draw).
    """
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    logits = logits.detach().cpu()  # one vector: sampling on the host keeps the draw device-independent
    if temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    cum = torch.cumsum(sorted_probs, dim=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    keep = int(torch.searchsorted(cum, torch.tensor([min(top_p, 1.0)], dtype=cum.dtype)).item()) + 1
    keep = min(keep, probs.numel())
    kept = cum[:keep]
    idx = int(torch.searchsorted(kept, torch.tensor([u * kept[-1].item()], dtype=kept.dtype)).item())
    return int(order[min(idx, keep - 1)].item())


@torch.no_grad()
def generate_ids(
    model: RWKV,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """New token ids after the prompt, RNN mode: the prompt in one call, then token by token."""
    if not prompt_ids:
        raise ValueError("generation needs a non-empty prompt (at least one token)")
    g = torch.Generator().manual_seed(seed)
    device = model.emb.weight.device
    logits, state = model.forward_rnn(torch.tensor(prompt_ids, dtype=torch.long, device=device))
    out: list[int] = []
    for _ in tqdm(range(max_tokens), desc="generate", unit="tok", leave=False, disable=max_tokens < 64):
        tok = sample_logits(logits.float(), temperature, top_p, g)
        out.append(tok)
        if stop_id is not None and tok == stop_id:
            break
        logits, state = model.forward_rnn(torch.tensor([tok], dtype=torch.long, device=device), state)
    return out


@dataclass
class ScoreResult:
    tokens: int  # number of predicted (scored) tokens
    mean_loss: float  # nats per token
    perplexity: float
    token_losses: list[float]


@torch.no_grad()
def score_ids(model: RWKV, ids: list[int], window: int | None = None) -> ScoreResult:
    """Per-token cross-entropy of ids[1:] given the preceding tokens, in windows of `window` tokens.

    Windows overlap by one token (a window's last target is the next window's first
    input), so every token after the first is scored exactly once.
    """
    if len(ids) < 2:
        raise ValueError(f"scoring needs at least 2 tokens, got {len(ids)}")
    window = window or model.cfg.ctx_len
    t = torch.tensor(ids, dtype=torch.long, device=model.emb.weight.device)
    losses: list[torch.Tensor] = []
    starts = range(0, len(ids) - 1, window)
    for s in tqdm(starts, desc="score", unit="window", leave=False, disable=len(starts) < 4):
        chunk = t[s : s + window + 1]
        logits = model(chunk[:-1].unsqueeze(0))[0].float()
        losses.append(F.cross_entropy(logits, chunk[1:], reduction="none"))
    all_losses = torch.cat(losses).double().cpu()
    mean = all_losses.mean().item()
    return ScoreResult(int(all_losses.numel()), mean, math.exp(mean), all_losses.tolist())


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def place_model(model: RWKV, device: str, dtype: str) -> RWKV:
    """Move the model to `device` in `dtype`; a clear ValueError for a device this machine lacks."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return model.to(device=dev, dtype=DTYPES[dtype])


def check_ids(ids: list[int], vocab_size: int, tokenizer: str) -> None:
    """Token ids the model's embedding can look up (a larger tokenizer than the model's is refused)."""
    top = max(ids, default=-1)
    if top >= vocab_size:
        raise ValueError(
            f"token id {top} from tokenizer {tokenizer!r} is outside the model's vocabulary of "
            f"{vocab_size}; use the tokenizer the model was trained with"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rwkv-generate", description="Sample from, or score text with, RWKV weights."
    )
    p.add_argument(
        "--weights",
        "--input",
        dest="weights",
        required=True,
        help="state dict / .pth file, HF directory, or DeepSpeed checkpoint directory",
    )
    p.add_argument("--tag", help="DeepSpeed checkpoint tag (default: 'latest')")
    p.add_argument("--model-config", help="JSON model config for a state dict without one beside it")
    p.add_argument("--tokenizer", help="tokenizer spec (default: the one recorded with the weights)")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", metavar="FILE", help="score FILE instead: per-token loss and perplexity")
    p.add_argument("--score-json", metavar="OUT", help="with --score: also write per-token losses here")
    p.add_argument(
        "--window", type=int, help="with --score: tokens per window (default: the model's ctx_len)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="weights' precision on the device (default fp32; bf16/fp16 on a GPU; the WKV state stays fp32)",
    )
    p.add_argument(
        "--wkv-backend",
        choices=["auto", "cuda", "cpu", "reference"],
        help="WKV implementation for parallel mode (default: the recorded one)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 0:
        parser.error("need --temperature >= 0, 0 < --top-p <= 1 and --max-tokens >= 0")
    if args.window is not None and args.window < 1:
        parser.error("--window must be at least 1")
    try:
        if args.score_json:
            check_writable_file(args.score_json, "the per-token losses (--score-json)")
        loaded = load_model(args.weights, args.tag, args.model_config, args.wkv_backend)
    except (CheckpointError, OutputPathError) as e:
        print(f"rwkv-generate: error: {e}", file=sys.stderr)
        return 2
    spec = args.tokenizer or find_tokenizer_spec(loaded.run_config, loaded.base_dir)
    if not spec:
        print(
            f"rwkv-generate: error: no tokenizer recorded with {args.weights}; pass --tokenizer",
            file=sys.stderr,
        )
        return 2
    from data_prep.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(spec)
    except Exception as e:  # missing file, unknown spec: the tokenizer's own message says which
        print(f"rwkv-generate: error: tokenizer {spec!r}: {e}", file=sys.stderr)
        return 2
    try:
        model = place_model(loaded.model, args.device, args.dtype)
    except (ValueError, RuntimeError) as e:
        print(f"rwkv-generate: error: {e}", file=sys.stderr)
        return 2
    if args.score:
        path = Path(args.score)
        if not path.is_file():
            print(f"rwkv-generate: error: {path}: no such file", file=sys.stderr)
            return 2
        try:
            ids = tok.encode(path.read_text(encoding="utf-8"))
            check_ids(ids, model.cfg.vocab_size, spec)
            res = score_ids(model, ids, args.window)
        except ValueError as e:  # UnicodeDecodeError too: a binary file
            print(f"rwkv-generate: error: {path}: {e}", file=sys.stderr)
            return 2
        summary = {
            "file": str(path),
            "tokens": res.tokens,
            "mean_loss": res.mean_loss,
            "perplexity": res.perplexity,
        }
        print(json.dumps(summary))
        if args.score_json:
            Path(args.score_json).write_text(json.dumps({**summary, "token_losses": res.token_losses}) + "\n")
        return 0
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        prompt_ids = [tok.eod_id]  # an empty prompt starts a fresh document
    try:
        check_ids(prompt_ids, model.cfg.vocab_size, spec)
    except ValueError as e:
        print(f"rwkv-generate: error: --prompt: {e}", file=sys.stderr)
        return 2
    new = generate_ids(
        model, prompt_ids, args.max_tokens, args.temperature, args.top_p, args.seed, stop_id=tok.eod_id
    )
    # decode prompt and continuation together: tokenizers drop a piece's leading space when it comes first
    head = tok.decode(prompt_ids)
    text = tok.decode(prompt_ids + [t for t in new if t != tok.eod_id])
    print(args.prompt + text[len(head) :] if text.startswith(head) else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
