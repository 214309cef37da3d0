"""launch.generate: seeded RNN-mode sampling, nucleus sampling, perplexity scoring, and the command
line on every weight format the pipeline produces (including a checkpoint of a real training run);
RWKV-4 and RWKV-7 (whose HF format runs in the `rwkv7_hf` reference model), RWKV-5 and RWKV-6 (no HF
format: their .pth runs in the `rwkv` package)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from weights import corpus_text, perturb

from launch import convert, generate
from launch.generate import generate_ids, sample_logits
from train.config import ModelConfig
from train.model import RWKV

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(demo_tokenizer):
    from data_prep.tokenizer import load_tokenizer

    return load_tokenizer(str(demo_tokenizer))


HAS_HF = {"rwkv4": True, "rwkv5": False, "rwkv6": False, "rwkv7": True}


@pytest.fixture(scope="module", params=["rwkv4", "rwkv5", "rwkv6", "rwkv7"])
def weights(request, tmp_path_factory, demo_tokenizer, tok) -> dict:
    """A perturbed 2-layer model as a state dict (tokenizer recorded beside it), .pth and HF dir."""
    cfg = ModelConfig(arch=request.param, n_layer=2, n_embd=64, vocab_size=tok.vocab_size, ctx_len=32,
                      wkv_backend="reference")
    torch.manual_seed(0)
    model = perturb(RWKV(cfg), seed=3).eval()
    d = tmp_path_factory.mktemp("generate_weights")
    sd = d / "model.pt"
    torch.save(model.state_dict(), sd)
    (d / "model.json").write_text(json.dumps({"model": cfg.to_dict(), "tokenizer": str(demo_tokenizer)}))
    assert convert.main(["--input", str(sd), "--to", "rwkv", "--output", str(d / "rwkv.pth")]) == 0
    if HAS_HF[request.param]:
        assert convert.main(["--input", str(sd), "--to", "hf", "--output", str(d / "hf")]) == 0
    return {"model": model, "state_dict": sd, "pth": d / "rwkv.pth", "hf": d / "hf", "dir": d,
            "arch": request.param}


# ------------------------------------------------------------------------------------ sampling
def nucleus_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Reference top-p: keep the most probable tokens until their mass reaches top_p, renormalise."""
    p = torch.softmax(logits.double() / temperature, -1)
    out = torch.zeros_like(p)
    mass = 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i].item()):
        out[i] = p[i]
        mass += p[i].item()
        if mass >= top_p:
            break
    return out / out.sum()


def test_sampler_draws_from_the_nucleus_distribution():
    logits = torch.tensor([2.0, 1.5, 0.3, -0.5, 1.0, -2.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(6)
    for _ in range(n):
        counts[sample_logits(logits, 0.7, 0.8, g)] += 1
    want = nucleus_distribution(logits, 0.7, 0.8)
    assert (counts / n - want).abs().max().item() < 0.015
    assert counts[want == 0].sum() == 0  # nothing outside the nucleus
    assert sample_logits(logits, 0.0, 0.9, g) == 0 and sample_logits(logits, 1.0, 1e-6, g) == 0


def test_generation_is_seeded_and_equals_sampling_from_parallel_logits(weights, tok):
    model = weights["model"]
    prompt = tok.encode(corpus_text(200, shard="01"))[:12]
    a = generate_ids(model, prompt, 40, temperature=1.0, top_p=0.9, seed=7)
    b = generate_ids(model, prompt, 40, temperature=1.0, top_p=0.9, seed=7)
    c = generate_ids(model, prompt, 40, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c and len(a) == 40
    # replay the same random draws against the parallel-mode logits of prompt + sampled tokens
    full = torch.tensor(prompt + a)
    with torch.no_grad():
        par = model(full[:-1].unsqueeze(0))[0]
    g = torch.Generator().manual_seed(7)
    replay = [sample_logits(par[len(prompt) - 1 + i], 1.0, 0.9, g) for i in range(len(a))]
    assert replay == a


# ------------------------------------------------------------------------------------ scoring
def test_score_perplexity_is_exp_of_independent_cross_entropy(weights, tok, tmp_path, capsys):
    from launch.hf_format import hf_format

    text_file = tmp_path / "heldout.txt"
    text_file.write_text(corpus_text(900, shard="01"), encoding="utf-8")
    report = tmp_path / "score.json"
    window = 48
    args = ["--weights", str(weights["pth"]), "--score", str(text_file), "--window", str(window)]
    assert generate.main([*args, "--score-json", str(report)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = json.loads(report.read_text())

    # independent: the HF conversion in transformers (RWKV-4) or rwkv7_hf (RWKV-7), the .pth in the rwkv
    # package (RWKV-5/6); log-softmax by hand, the same windows
    ids = torch.tensor(tok.encode(text_file.read_text(encoding="utf-8")))
    if HAS_HF[weights["arch"]]:
        hf = hf_format(weights["arch"]).load_hf_model(weights["hf"])

        def logits_of(t: torch.Tensor) -> torch.Tensor:
            return hf(t.unsqueeze(0)).logits[0]
    else:
        convert.rwkv_package_logits(weights["pth"], ids[:1], weights["arch"])  # sets the package's env
        from rwkv.model import RWKV as RwkvPackageModel

        pkg = RwkvPackageModel(model=str(weights["pth"]), strategy="cpu fp32", verbose=False)

        def logits_of(t: torch.Tensor) -> torch.Tensor:
            # a one-token window comes back as (V,): the package's single-step path
            return pkg.forward(t.tolist(), None, full_output=True)[0].float().reshape(len(t), -1)
    losses = []
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            chunk = ids[s : s + window + 1]
            logp = torch.log_softmax(logits_of(chunk[:-1]).double(), -1)
            losses.append(-logp.gather(1, chunk[1:, None])[:, 0])
    losses = torch.cat(losses)
    assert got["tokens"] == printed["tokens"] == len(ids) - 1 == len(got["token_losses"])
    assert torch.allclose(torch.tensor(got["token_losses"], dtype=torch.float64), losses, atol=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-5)
    assert printed["perplexity"] == pytest.approx(got["perplexity"])


# ------------------------------------------------------------------------------------ command line
def test_cli_gives_the_same_text_from_state_dict_pth_and_hf(weights, capsys):
    outs = []
    for source in ("state_dict", "pth", "hf") if HAS_HF[weights["arch"]] else ("state_dict", "pth", "pth"):
        argv = ["--weights", str(weights[source]), "--prompt", "KING.", "--max-tokens", "24", "--seed", "3"]
        assert generate.main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2]
    assert outs[0].startswith("KING.") and len(outs[0]) > len("KING.") + 10


def test_cli_without_a_tokenizer_says_so(weights, tmp_path, capsys):
    bare = tmp_path / "bare.pt"
    bare.write_bytes(weights["state_dict"].read_bytes())  # no model.json beside it: no tokenizer known
    with pytest.warns(UserWarning):
        assert generate.main(["--weights", str(bare), "--prompt", "x"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ a real run
# RWKV-7: the rwkv7-tiny preset at 2 x 64 (one head) on top of configs/tiny.yaml
ARCH_SETS = {"rwkv4": [], "rwkv7": ["model.preset=rwkv7-tiny", "model.n_layer=2", "model.n_embd=64"]}


@pytest.fixture(scope="module", params=["rwkv4", "rwkv7"])
def trained_run(request, tmp_path_factory, demo_shards) -> Path:
    """`python -m train` with configs/tiny.yaml on 2 processes (ZeRO-2), 10 steps, checkpoints every 5."""
    run_dir = tmp_path_factory.mktemp(f"tiny_run_{request.param}")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--standalone",  # the store binds a free port itself: no port race
        "-m", "train", "--config", str(ROOT / "configs/tiny.yaml"),
        "--set", f"run_dir={run_dir}", "--set", f"data.manifests=[{demo_shards}]",
        "--set", "train.steps=10", "--set", "checkpoint.every=5", "--set", "log.progress=false",
    ]  # fmt: skip
    for s in ARCH_SETS[request.param]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_trained_checkpoint_converts_verifies_and_generates(trained_run, tmp_path, capsys, tok):
    ckpt = trained_run / "checkpoints"
    for to, out in (("rwkv", tmp_path / "m.pth"), ("hf", tmp_path / "hf")):
        assert convert.main(["--input", str(ckpt), "--to", to, "--output", str(out), "--verify"]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("verify:")][0]
        assert float(line.split("=")[1].split()[0]) <= 1e-4
        assert "(tokenizer;" in line  # found through the run's config and token manifest
    # the sidecar carries the run's resolved model config ("auto" filled in), as the trainer recorded it
    side = json.loads((tmp_path / "m.json").read_text())["model"]
    tag = (ckpt / "latest").read_text().strip()
    states = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False, mmap=True)
    assert side == states["model_config"]

    # the checkpoint, the .pth and the HF directory generate the same text with the run's tokenizer
    outs = []
    for weights in (ckpt, tmp_path / "m.pth", tmp_path / "hf"):
        assert generate.main(["--weights", str(weights), "--prompt", "ROMEO.", "--max-tokens", "20"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2] and outs[0].startswith("ROMEO.")

    text = tmp_path / "t.txt"
    text.write_text(corpus_text(1500, shard="01"), encoding="utf-8")
    assert generate.main(["--weights", str(tmp_path / "m.pth"), "--score", str(text)]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert ppl < tok.vocab_size / 2  # a fresh init is near uniform (perplexity ~ vocab size)
