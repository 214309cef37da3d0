"""The GPU path's CPU-checkable parts: `make gpu-check` without a GPU, and the commands' GPU options."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def test_gpu_check_dry_run_lists_every_check_and_missing_packages():
    from launch import gpu_check

    proc = run("-m", "launch.gpu_check", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for name, _, _ in gpu_check.CHECKS:
        assert f"  {name} " in proc.stdout
    assert "packages missing here:" in proc.stdout and "CUDA device:" in proc.stdout


def test_gpu_check_names_a_missing_package_with_the_wheel_recipe(monkeypatch, capsys):
    from launch import gpu_check

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "hjson" else real(name, *a)
    )
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "packages missing here: hjson" in out and "pip wheel --no-deps --no-build-isolation deepspeed" in out
    )


def test_gpu_check_without_a_gpu_says_so():
    proc = run("-m", "launch.gpu_check", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "no CUDA device on this machine" in proc.stdout and "nothing was checked" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_on_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    from launch.generate import place_model
    from train.config import ModelConfig
    from train.model import RWKV

    model = RWKV(ModelConfig(n_layer=1, n_embd=8, vocab_size=16))
    with pytest.raises(ValueError, match="--device cuda: no CUDA device here"):
        place_model(model, "cuda", "bf16")
    assert place_model(model, "cpu", "bf16").emb.weight.dtype == torch.bfloat16


def test_convert_verify_without_its_package_refuses_before_writing(tmp_path, monkeypatch, capsys):
    """--verify --to rwkv on a machine without the `rwkv` package: exit 2 at once, nothing written."""
    from launch import convert

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "rwkv" else real(name, *a)
    )
    out = tmp_path / "model.pth"
    rc = convert.main(
        ["--input", str(tmp_path / "missing"), "--to", "rwkv", "--output", str(out), "--verify"]
    )
    assert rc == 2 and not out.exists()
    assert "--verify --to rwkv runs the weights in the `rwkv` package, which is not installed" in (
        capsys.readouterr().err
    )
