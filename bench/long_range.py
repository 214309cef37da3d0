"""Long-range recall: small models of each architecture, equal parameters and steps, accuracy by distance.

    python bench/long_range.py [--archs rwkv4,rrwkv] [--steps 300] [--distances 64,256,1024,4096]
                               [--out docs/long_range.png]

The task (key-value recall): a sequence starts with `--pairs` (key, value) pairs (distinct keys), then
D distractor tokens, then a query marker and one of the keys; the model must output that key's value.
Only that answer is scored (loss and accuracy), and accuracy is the argmax over the value tokens
(chance: 1 / n_values).

Every architecture in `train.models.ARCH_MODULES` runs by default (`--archs` chooses; an entry
`arch@field=value;...` is that architecture with ModelConfig overrides, e.g. `rrwkv@medium_every=8`).
Every model has the same depth and width (`--n-layer`, `--n-embd`) and the channel-mix width that
brings its parameter count closest to the first one's; all see the same batches (same seed) for the
same steps at the same learning rate. Training runs on the CPU twins of the WKV kernels (`wkv_backend`
auto) with `--threads` threads. To fit in minutes on two cores, models train at distances up to
`--train-max-distance` (each batch one distance, uniform) and are evaluated at every `--distances`
entry: the long distances measure how far what was learnt carries, not what training at that
distance would reach.

Prints a table (accuracy by distance, one row per model) and writes a PNG plot.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.config import ModelConfig  # noqa: E402
from train.model import RWKV  # noqa: E402
from train.models import ARCH_MODULES, ARCH_TITLES  # noqa: E402

# Token layout: 0 = start, 1 = query marker, then keys, values, distractors.
START, QUERY = 0, 1


@dataclass(frozen=True)
class Task:
    n_keys: int = 16
    n_values: int = 16
    n_distractors: int = 16
    pairs: int = 4

    @property
    def vocab_size(self) -> int:
        return 2 + self.n_keys + self.n_values + self.n_distractors

    def batch(self, batch: int, distance: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx (B, T), target value ids (B,)); the answer is predicted at the last position."""
        keys = torch.argsort(torch.rand(batch, self.n_keys, generator=gen), dim=1)[:, : self.pairs] + 2
        values = torch.randint(0, self.n_values, (batch, self.pairs), generator=gen) + 2 + self.n_keys
        pairs = torch.stack([keys, values], dim=2).reshape(batch, 2 * self.pairs)
        first = 2 + self.n_keys + self.n_values
        noise = torch.randint(first, first + self.n_distractors, (batch, distance), generator=gen)
        which = torch.randint(0, self.pairs, (batch,), generator=gen)
        rows = torch.arange(batch)
        query = torch.stack([torch.full((batch,), QUERY), keys[rows, which]], dim=1)
        idx = torch.cat([torch.full((batch, 1), START), pairs, noise, query], dim=1)
        return idx, values[rows, which]

    def value_ids(self) -> slice:
        return slice(2 + self.n_keys, 2 + self.n_keys + self.n_values)


def parse_arch(spec: str) -> tuple[str, dict]:
    """`arch` or `arch@field=value,field=value` -> (arch, ModelConfig overrides)."""
    arch, _, rest = spec.partition("@")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    return arch, overrides


def config_for(arch: str, overrides: dict, args: argparse.Namespace, vocab: int,
               dim_ffn: int = 0) -> ModelConfig:
    values = {"n_layer": args.n_layer, "n_embd": args.n_embd, "head_size": args.head_size, **overrides}
    return ModelConfig(arch=arch, vocab_size=vocab, ctx_len=4096, dim_ffn=dim_ffn, **values)


def matched_ffn(arch: str, overrides: dict, target: int, args: argparse.Namespace, vocab: int) -> int:
    """The channel-mix width (a multiple of 8) whose parameter count is closest to target: every model
    has the same depth and width, and what an architecture adds elsewhere comes out of its FFN."""
    best = None
    for dim_ffn in range(8, 16 * args.n_embd + 1, 8):
        n = config_for(arch, overrides, args, vocab, dim_ffn).n_params()
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (dim_ffn, n)
    return best[0]


def accuracy(model: torch.nn.Module, task: Task, distance: int, samples: int, batch: int,
             gen: torch.Generator) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, samples, batch):
            idx, target = task.batch(min(batch, samples - start), distance, gen)
            logits = model(idx)[:, -1, task.value_ids()]
            correct += int((logits.argmax(-1) + task.value_ids().start == target).sum())
    return correct / samples


def train_one(spec: str, cfg: ModelConfig, task: Task, args: argparse.Namespace) -> tuple[list[float], float]:
    torch.manual_seed(args.seed)
    model = RWKV(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    t0 = time.time()
    for step in range(args.steps):
        cosine = 0.5 * (1 + math.cos(math.pi * step / args.steps))
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * cosine)
        for group in opt.param_groups:
            group["lr"] = lr
        distance = int(torch.randint(0, args.train_max_distance + 1, (1,), generator=gen))
        idx, target = task.batch(args.batch, distance, gen)
        loss = F.cross_entropy(model(idx)[:, -1].float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  {spec}: step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)",
                  flush=True)
    model.eval()
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    accs = [accuracy(model, task, d, args.eval_samples, args.eval_batch, eval_gen) for d in args.distances]
    return accs, time.time() - t0


def plot(rows: list[tuple[str, int, list[float]]], distances: list[int], chance: float, path: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, _, accs in rows:
        ax.plot(distances, accs, marker="o", label=name)
    ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(distances, [str(d) for d in distances])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("distance D (distractor tokens between the pairs and the query)")
    ax.set_ylabel("recall accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[tuple[str, int, list[float]]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=",".join(ARCH_MODULES),
                    help="comma-separated; `arch@field=value;...` adds ModelConfig overrides (default: all)")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64, help="width of every model")
    ap.add_argument("--head-size", type=int, default=64, help="RWKV-5/6/7 head size (their CPU kernels: 64)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-max-distance", type=int, default=64)
    ap.add_argument("--distances", default="64,256,1024,4096")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="long_range.png", help="PNG plot path")
    ap.add_argument("--params-like", help="arch spec whose parameter count all match (default: the first)")
    args = ap.parse_args(argv)
    # ';' separates overrides on the command line (',' separates archs)
    specs = [s.strip().replace(";", ",") for s in args.archs.split(",") if s.strip()]
    args.distances = [int(d) for d in args.distances.split(",")]
    torch.set_num_threads(args.threads)
    task = Task(pairs=args.pairs)

    arch0, over0 = parse_arch((args.params_like or specs[0]).replace(";", ","))
    target = config_for(arch0, over0, args, task.vocab_size).n_params()
    rows = []
    for spec in specs:
        arch, overrides = parse_arch(spec)
        dim_ffn = matched_ffn(arch, overrides, target, args, task.vocab_size)
        cfg = config_for(arch, overrides, args, task.vocab_size, dim_ffn)
        name = ARCH_TITLES.get(arch, arch) + ("" if not overrides else " " + spec.partition("@")[2])
        print(f"{name}: {cfg.n_layer} x {cfg.n_embd}, dim_ffn {dim_ffn}, {cfg.n_params():,} params",
              flush=True)
        accs, seconds = train_one(spec, cfg, task, args)
        print(f"  {name}: {seconds:.0f}s", flush=True)
        rows.append((name, cfg.n_params(), accs))

    chance = 1 / task.n_values
    print(f"\nrecall accuracy by distance ({args.pairs} pairs, {task.n_values} values: chance {chance:.3f}; "
          f"{args.steps} steps x {args.batch}, trained at D <= {args.train_max_distance})")
    header = "| model | params | " + " | ".join(f"D={d}" for d in args.distances) + " |"
    print(header)
    print("|" + "---|" * (2 + len(args.distances)))
    for name, n, accs in rows:
        print(f"| {name} | {n:,} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    title = (f"key-value recall, {args.pairs} pairs; {args.steps} steps, trained at D <= "
             f"{args.train_max_distance}; {args.n_layer} layers, ~{target:,} params")
    plot(rows, args.distances, chance, Path(args.out), title)
    print(f"plot: {args.out}")
    return rows


if __name__ == "__main__":
    main()
