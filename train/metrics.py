"""Run metrics: `metrics.jsonl` (one JSON object per optimizer step / validation), TensorBoard, MFU.

Only rank 0 writes. On resume the file is cut back to the resumed step, so that it reads as if the
run had never been interrupted (the steps after the checkpoint are trained again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak per device in TFLOP/s (no sparsity), by substring of the CUDA device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}
CPU_DEFAULT_PEAK_TFLOPS = 1.0


def peak_tflops(configured: float) -> float:
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value
    return CPU_DEFAULT_PEAK_TFLOPS


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int, peak_tflops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the job's peak."""
    return tokens_per_s * flops_per_token / (world_size * peak_tflops_per_device * 1e12)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only records with step <= `step`; returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line cut by a kill mid-write
            continue
        if int(rec.get("step", 0)) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """metrics.jsonl plus TensorBoard scalars; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        self._file = open(self.path, "a") if enabled else None  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.tb is not None:
            self.tb.close()
