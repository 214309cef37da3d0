"""Validation loss by token position in the window: does the model use long context?

The per-position loss over the validation windows is summed on the device, reduced once over ranks, and
reported as means over buckets of positions (0-1k, 1k-4k, 4k-16k, ... up to seq_len; scaled down for
short windows) in metrics.jsonl and TensorBoard, plus a PNG plot of loss against position written into
the run directory (when matplotlib is installed; training never needs it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

PLOT_NAME = "val_loss_by_position.png"
PLOT_BINS = 128  # at most this many points on the plotted curve (log-spaced position bins)


def bucket_edges(seq_len: int) -> list[int]:
    """0, base, 4 base, 16 base, ... (below seq_len), seq_len; base 1024 (seq_len / 16 for short windows)."""
    base = 1024 if seq_len > 1024 else max(1, seq_len // 16)
    edges, e = [0], base
    while e < seq_len:
        edges.append(e)
        e *= 4
    return edges + [seq_len]


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def bucket_names(edges: list[int]) -> list[str]:
    return [f"{_short(a)}-{_short(b)}" for a, b in zip(edges, edges[1:], strict=False)]


class PositionLoss:
    """Sums of the per-token loss by position over the validation windows (on the device)."""

    def __init__(self, seq_len: int, device: torch.device):
        self.seq_len = seq_len
        self.sums = torch.zeros(seq_len + 1, dtype=torch.float64, device=device)  # last: windows counted

    def add(self, offset: int, token_loss: torch.Tensor) -> None:
        """token_loss (B, T): the loss of positions offset..offset+T of B windows (count them at offset 0)."""
        T = token_loss.shape[1]
        self.sums[offset : offset + T] += token_loss.detach().double().sum(0)
        if offset == 0:
            self.sums[-1] += token_loss.shape[0]

    def result(self, all_reduce: Callable[[torch.Tensor], list[float]]) -> tuple[float, list[float]] | None:
        """(mean loss, mean loss per position) over all ranks, or None without windows."""
        values = all_reduce(self.sums)
        n = values[-1]
        if not n:
            return None
        per_pos = [v / n for v in values[:-1]]
        return sum(per_pos) / len(per_pos), per_pos


def buckets(per_pos: list[float]) -> dict[str, float]:
    edges = bucket_edges(len(per_pos))
    return {
        name: sum(per_pos[a:b]) / (b - a)
        for name, a, b in zip(bucket_names(edges), edges, edges[1:], strict=False)
    }


def plot(run_dir: Path, per_pos: list[float], step: int, log: Callable[[str], None]) -> Path | None:
    """Loss against position (binned), with the bucket means, into run_dir/PLOT_NAME; None (and a log
    line) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"val: matplotlib is not installed; not plotting {PLOT_NAME} (pip install matplotlib)")
        return None
    T = len(per_pos)
    # log-spaced bins (the axis is logarithmic): single positions at the start, wide bins at the end
    cuts = sorted({0, T} | {min(T, round(T ** (i / PLOT_BINS))) for i in range(1, PLOT_BINS)})
    xs, ys = [], []
    for a, b in zip(cuts, cuts[1:], strict=False):
        xs.append((a + b - 1) / 2)
        ys.append(sum(per_pos[a:b]) / (b - a))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, ys, label=f"mean over {len(xs)} log-spaced position bins")
    edges = bucket_edges(T)
    for (name, value), a, b in zip(buckets(per_pos).items(), edges, edges[1:], strict=False):
        ax.hlines(value, a, b - 1, colors="tab:red", linewidth=2)
        ax.annotate(f"{name}: {value:.3f}", ((a + b) / 2, value), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8, color="tab:red")
    ax.set_xscale("symlog", linthresh=max(1, edges[1]))
    ax.set_xlabel("token position in the window")
    ax.set_ylabel("validation loss")
    ax.set_title(f"validation loss by position, step {step}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(run_dir) / PLOT_NAME
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
