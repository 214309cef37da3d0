"""Run metrics: `metrics.jsonl` (one JSON object per optimizer step / validation), TensorBoard, MFU.

Only rank 0 writes. On resume the file is cut back to the resumed step, so that it reads as if the
run had never been interrupted (the steps after the checkpoint are trained again).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class DevicePeak:
    """Published dense peaks of one device model in TFLOP/s (no 2:4 sparsity); None: not supported."""

    bf16: float | None  # bf16 tensor cores (fp16 is the same on every device listed)
    fp16: float
    tf32: float | None  # fp32 matmuls when TF32 is allowed
    fp32: float  # plain fp32 (CUDA cores), torch's default for fp32 matmuls


# By pattern on torch.cuda.get_device_name(), most specific first. Figures from NVIDIA's data sheets
# (the "with sparsity" figures halved): H100 SXM5/PCIe/NVL, H200 SXM/NVL, A100, L40S, L40, L4, A10, V100.
GPU_PEAKS: list[tuple[str, DevicePeak]] = [
    (r"H100.*NVL", DevicePeak(bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0)),
    (r"H100.*PCIe", DevicePeak(bf16=756.5, fp16=756.5, tf32=378.0, fp32=51.2)),
    (r"H100", DevicePeak(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),  # SXM5: "H100 80GB HBM3"
    (r"H200.*NVL", DevicePeak(bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0)),
    (r"H200", DevicePeak(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),  # SXM, and GH200
    (r"A100", DevicePeak(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),  # SXM4 and PCIe, 40/80 GB
    (r"L40S", DevicePeak(bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6)),
    (r"L40\b", DevicePeak(bf16=181.05, fp16=181.05, tf32=90.5, fp32=90.5)),
    (r"L4\b", DevicePeak(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    (r"A10\b", DevicePeak(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),  # not A10G (no NVIDIA figure)
    (r"V100.*PCIe", DevicePeak(bf16=None, fp16=112.0, tf32=None, fp32=14.0)),
    (r"V100", DevicePeak(bf16=None, fp16=125.0, tf32=None, fp32=15.7)),  # SXM2
]
# CPU runs: a nominal 1 TFLOP/s per process, so MFU on CPU is a relative figure only.
CPU_NOMINAL_PEAK_TFLOPS = 1.0


def device_peak_tflops(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """Dense peak TFLOP/s of `device_name` at a training precision (bf16 | fp16 | fp32); None if unknown.

    fp32 counts at the TF32 tensor-core peak only when TF32 matmuls are allowed (`tf32`)."""
    for pattern, peak in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if precision == "bf16":
                return peak.bf16
            if precision == "fp16":
                return peak.fp16
            return peak.tf32 if tf32 and peak.tf32 is not None else peak.fp32
    return None


def peak_tflops(configured: float, device: torch.device, precision: str) -> float | None:
    """Per-device peak for MFU: log.peak_tflops when set, else the table by device name; None if unknown."""
    if configured > 0:
        return configured
    if device.type == "cpu":
        return CPU_NOMINAL_PEAK_TFLOPS
    if device.type != "cuda":
        return None
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return device_peak_tflops(torch.cuda.get_device_name(device), precision, tf32)


def mfu(
    tokens_per_s: float, flops_per_token: float, world_size: int, peak_tflops_per_device: float | None
) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the job's peak (None without a peak)."""
    if not peak_tflops_per_device:
        return None
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
                if key == "val_loss_by_position":  # val/loss_by_position/0-1k, ...
                    for bucket, v in value.items():
                        self.tb.add_scalar(f"val/loss_by_position/{bucket}", v, step)
                elif key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.tb is not None:
            self.tb.close()
