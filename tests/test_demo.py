"""`python -m launch.demo --quick`: the whole demo end to end, in its reduced form.

Checks every artefact the demo promises, that the training was interrupted and resumed from a
ZeRO checkpoint, that both converted formats load in their own inference packages and agree with
each other, that training lowered the held-out perplexity, and that a second run skips every step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.demo import PROMPT

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (REPO / "train" / "__main__.py").is_file() or not (REPO / "configs" / "demo.yaml").is_file(),
        reason="the trainer or configs/demo.yaml is not there",
    ),
]


def run_demo(out: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "launch.demo", "--quick", "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = run_demo(out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return out, proc


def test_demo_artefacts_and_resume(demo_run) -> None:
    out, proc = demo_run
    run_dir = out / "run"
    for path in [
        out / "tokenizer" / "demo.model",
        out / "data" / "demo.manifest.json",
        out / "data" / "heldout.txt",
        run_dir / "config.resolved.yaml",
        run_dir / "metrics.jsonl",
        out / "weights" / "demo.pth",
        out / "weights" / "hf" / "config.json",
        out / "weights" / "hf" / "model.safetensors",
        out / "sample.txt",
    ]:
        assert path.is_file() and path.stat().st_size > 0, f"missing artefact {path}"
    assert list((run_dir / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (run_dir / "checkpoints" / "step100" / "complete.json").is_file()

    manifest = json.loads((out / "data" / "demo.manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and manifest["tokenizer"]["vocab_size"] == 512

    # interrupted after a checkpoint (SIGKILL of the whole run), then resumed from that checkpoint
    state = json.loads((out / "demo_state.json").read_text())
    assert 0 < state["interrupted_at"] < 100 and state["resumed_from"] == state["interrupted_at"]
    part2 = (out / "logs" / "train_part2.log").read_text()
    first_tag = run_dir / "checkpoints" / f"step{state['interrupted_at']}"
    assert f"resumed from {first_tag} at step {state['interrupted_at']}" in part2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 100

    # the summary names every artefact and the TensorBoard command
    assert f"tensorboard --logdir {run_dir / 'tb'}" in proc.stdout
    assert "(missing)" not in proc.stdout
    sample = (out / "sample.txt").read_text()
    assert sample.startswith(PROMPT) and len(sample.strip()) > len(PROMPT.strip())


def test_demo_perplexity_drops_with_training(demo_run) -> None:
    out, _ = demo_run
    ppl = json.loads((out / "perplexity.json").read_text())
    fresh = ppl["fresh initialisation"]
    trained = next(v for k, v in ppl.items() if k.startswith("trained"))
    first = next(v for k, v in ppl.items() if k.startswith("first checkpoint"))
    assert fresh["tokens"] == trained["tokens"] > 1000
    assert trained["perplexity"] < first["perplexity"] < fresh["perplexity"]


def test_demo_converted_weights_load_and_agree(demo_run) -> None:
    """The rwkv package reading demo.pth (RWKV_V7_ON=1) and the rwkv7_hf model reading the HF
    directory are two independent RWKV-7 implementations: on held-out tokens their logits must match."""
    out, _ = demo_run
    from data_prep.tokenizer import load_tokenizer
    from launch.convert import rwkv_package_logits
    from launch.hf_format import hf_format

    tok = load_tokenizer(str(out / "tokenizer" / "demo.model"))
    ids = torch.tensor(tok.encode((out / "data" / "heldout.txt").read_text())[:64])
    pkg_logits = rwkv_package_logits(out / "weights" / "demo.pth", ids, "rwkv7")
    hf = hf_format("rwkv7").load_hf_model(out / "weights" / "hf")
    with torch.no_grad():
        hf_logits = hf(ids.unsqueeze(0)).logits[0]
    assert pkg_logits.shape == hf_logits.shape == (len(ids), 512)
    assert (pkg_logits.float() - hf_logits).abs().max().item() <= 1e-4


def test_arch_flag_picks_the_preset_and_keeps_the_demo_sizes(tmp_path) -> None:
    """--arch rwkv4|rwkv5|rwkv6 trains the demo's sizes as that generation; the default is RWKV-7."""
    from launch.demo import build_parser, demo_settings, run_config
    from train.config import ModelConfig

    for arch, expected in (("rwkv7", "rwkv7"), ("rwkv4", "rwkv4"), ("rwkv5", "rwkv5"), ("rwkv6", "rwkv6"),
                           ("rrwkv", "rrwkv")):
        args = build_parser().parse_args(["--out", str(tmp_path), "--arch", arch])
        model = run_config(demo_settings(args)).model
        sizes = {k: v for k, v in model.overrides.items() if k in ("n_layer", "n_embd")}
        mc = ModelConfig.from_preset(model.preset, **sizes)
        assert (mc.arch, mc.n_layer, mc.n_embd) == (expected, 6, 256)


def test_demo_rerun_skips_finished_steps(demo_run) -> None:
    out, first = demo_run
    steps = len(re.findall(r"^\[\d+/(\d+)\]", first.stdout, flags=re.M))
    again = run_demo(out, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already done, skipping") == steps
    assert not re.search(r"^\$ ", again.stdout, flags=re.M)  # no command was run
