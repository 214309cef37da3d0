"""launch.convert: outputs loaded by the `rwkv` package and by transformers give our model's logits.

Weights are randomly perturbed everywhere (a fresh init zeroes five projections, which would hide
a swapped or dropped tensor); the text is real corpus text through the demo tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from weights import corpus_text, perturb

from launch import convert
from train.config import ModelConfig
from train.model import RWKV

FP32_TOL = 1e-4
# bf16 keeps 8 mantissa bits: each weight moves by up to 2^-9 relative. Through 3 perturbed layers
# this moved logits of magnitude ~7 by 0.056-0.073 (about 1% of the largest logit; seeds 0-2);
# the bound is 2% of the largest logit.
BF16_REL_TOL = 0.02


@pytest.fixture(scope="module")
def text_ids(demo_tokenizer) -> torch.Tensor:
    from data_prep.tokenizer import load_tokenizer

    ids = load_tokenizer(str(demo_tokenizer)).encode(corpus_text(600))
    assert len(ids) >= 40
    return torch.tensor(ids[:96], dtype=torch.long)


@pytest.fixture(scope="module")
def source(tmp_path_factory, demo_tokenizer) -> dict:
    """A perturbed 3-layer model saved as a plain state dict with its config beside it."""
    from data_prep.tokenizer import load_tokenizer

    vocab = load_tokenizer(str(demo_tokenizer)).vocab_size
    cfg = ModelConfig(n_layer=3, n_embd=64, vocab_size=vocab, ctx_len=64, wkv_backend="reference")
    torch.manual_seed(0)
    model = perturb(RWKV(cfg)).eval()
    d = tmp_path_factory.mktemp("convert_src")
    path = d / "model.pt"
    torch.save(model.state_dict(), path)
    (d / "model.json").write_text(json.dumps({"model": cfg.to_dict(), "tokenizer": str(demo_tokenizer)}))
    return {"path": path, "model": model, "cfg": cfg}


def our_logits(model: RWKV, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.unsqueeze(0))[0].float()


def rwkv_package_logits(path: Path, ids: torch.Tensor, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as RwkvPackageModel

    pkg = RwkvPackageModel(model=str(path), strategy="cpu fp32", verbose=False)
    logits, _ = pkg.forward(ids.tolist(), None, full_output=True)
    return logits.float()


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import RwkvForCausalLM

    hf = RwkvForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids.unsqueeze(0)).logits[0].float()


def run_convert(*args: str) -> int:
    return convert.main([str(a) for a in args])


# ------------------------------------------------------------------------------------ fp32 outputs
def test_rwkv_pth_loads_in_the_rwkv_package_with_equal_logits(source, text_ids, tmp_path, monkeypatch):
    out = tmp_path / "model.pth"
    assert run_convert("--input", source["path"], "--to", "rwkv", "--output", out) == 0
    theirs = rwkv_package_logits(out, text_ids, monkeypatch)
    ours = our_logits(source["model"], text_ids)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= FP32_TOL


def test_hf_directory_loads_in_transformers_with_equal_logits_and_generates(source, text_ids, tmp_path):
    from transformers import RwkvForCausalLM

    from launch.generate import generate_ids

    out = tmp_path / "hf"
    assert run_convert("--input", source["path"], "--to", "hf", "--output", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rescale_every"] == 0 and cfg["tie_word_embeddings"] is False
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (
        3,
        64,
        source["cfg"].vocab_size,
    )
    assert (theirs := hf_logits(out, text_ids)).shape == (len(text_ids), source["cfg"].vocab_size)
    assert (theirs - our_logits(source["model"], text_ids)).abs().max().item() <= FP32_TOL

    # transformers' own greedy generate (its RNN state path) picks the tokens our RNN mode picks
    hf = RwkvForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = text_ids[:16]
    with torch.no_grad():
        hf_new = hf.generate(prompt.unsqueeze(0), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
    ours_new = generate_ids(source["model"], prompt.tolist(), 12, temperature=0.0)
    assert hf_new.tolist() == ours_new


def test_fp32_output_is_the_exact_state_dict_and_records_the_config(source, tmp_path):
    out = tmp_path / "consolidated.pt"
    assert run_convert("--input", source["path"], "--to", "fp32", "--output", out) == 0
    got = torch.load(out, map_location="cpu", weights_only=True)
    want = source["model"].state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["model"]["n_layer"] == 3 and side["model"]["n_embd"] == 64


def test_architecture_is_inferred_from_shapes_without_a_config(source, text_ids, tmp_path, monkeypatch):
    bare = tmp_path / "bare.pt"
    shutil.copy(source["path"], bare)  # no bare.json / config.json beside it
    out = tmp_path / "bare_rwkv.pth"
    with pytest.warns(UserWarning, match="inferred from tensor shapes"):
        assert run_convert("--input", bare, "--to", "rwkv", "--output", out) == 0
    side = json.loads(out.with_suffix(".json").read_text())["model"]
    assert (side["n_layer"], side["n_embd"], side["dim_ffn"]) == (3, 64, 256)
    theirs = rwkv_package_logits(out, text_ids, monkeypatch)
    assert (theirs - our_logits(source["model"], text_ids)).abs().max().item() <= FP32_TOL


# ------------------------------------------------------------------------------------ bf16 outputs
def test_bf16_outputs_stay_within_the_stated_tolerance(source, text_ids, tmp_path, monkeypatch):
    pth, hf_dir = tmp_path / "bf16.pth", tmp_path / "bf16_hf"
    assert run_convert("--input", source["path"], "--to", "rwkv", "--output", pth, "--dtype", "bf16") == 0
    assert run_convert("--input", source["path"], "--to", "hf", "--output", hf_dir, "--dtype", "bf16") == 0
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    ours = our_logits(source["model"], text_ids)
    d_pkg = (rwkv_package_logits(pth, text_ids, monkeypatch) - ours).abs().max().item()
    d_hf = (hf_logits(hf_dir, text_ids) - ours).abs().max().item()
    bound = BF16_REL_TOL * ours.abs().max().item()
    assert d_pkg <= bound and d_hf <= bound
    assert d_pkg > 0  # the cast really happened


def test_verify_flag_reports_the_logit_difference(source, tmp_path, capsys):
    assert run_convert("--input", source["path"], "--to", "hf", "--output", tmp_path / "v", "--verify") == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("verify:")][0]
    diff = float(line.split("=")[1].split()[0])
    assert 0 <= diff <= FP32_TOL
    assert "tokenizer" in line  # the tokenizer recorded beside the weights was used for the text


# ------------------------------------------------------------------------------------ bad input
def test_truncated_state_dict_is_refused_naming_the_file(source, tmp_path, capsys):
    bad = tmp_path / "cut.pt"
    data = source["path"].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert run_convert("--input", bad, "--to", "rwkv", "--output", tmp_path / "o.pth") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and ("truncated" in err or "corrupt" in err)
    assert not (tmp_path / "o.pth").exists()


def test_unknown_layout_and_missing_tag_are_refused(source, tmp_path, capsys):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert run_convert("--input", empty, "--to", "fp32", "--output", tmp_path / "o.pt") == 2
    assert "unknown layout" in capsys.readouterr().err

    not_rwkv = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(2, 2)}, not_rwkv)
    assert run_convert("--input", not_rwkv, "--to", "fp32", "--output", tmp_path / "o.pt") == 2
    err = capsys.readouterr().err
    assert str(not_rwkv) in err and "emb.weight" in err

    ckpt = tmp_path / "checkpoints"
    (ckpt / "step5").mkdir(parents=True)
    torch.save(
        {"module": torch.load(source["path"], weights_only=True)}, ckpt / "step5/mp_rank_00_model_states.pt"
    )
    assert run_convert("--input", ckpt, "--tag", "step9", "--to", "fp32", "--output", tmp_path / "o.pt") == 2
    err = capsys.readouterr().err
    assert "step9" in err and "step5" in err  # names the missing tag and what is there


def test_stage0_module_file_without_latest_uses_the_newest_tag(source, tmp_path):
    ckpt = tmp_path / "checkpoints"
    sd = torch.load(source["path"], weights_only=True)
    for step, scale in ((5, 0.0), (12, 1.0)):
        (ckpt / f"step{step}").mkdir(parents=True)
        module = {k: v * scale for k, v in sd.items()}
        torch.save(
            {"module": module, "config": {"model": source["cfg"].to_dict()}},
            ckpt / f"step{step}/mp_rank_00_model_states.pt",
        )
    out = tmp_path / "o.pt"
    assert run_convert("--input", ckpt, "--to", "fp32", "--output", out) == 0
    got = torch.load(out, weights_only=True)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_an_incomplete_latest_tag_falls_back_to_the_newest_complete_one(source, tmp_path):
    """Tags written by the trainer carry complete.json with file sizes; `latest` may name a tag
    whose save never finished on every rank."""
    ckpt = tmp_path / "checkpoints"
    sd = torch.load(source["path"], weights_only=True)
    for step, scale in ((5, 1.0), (10, 0.5)):
        tag = ckpt / f"step{step}"
        tag.mkdir(parents=True)
        module = {k: v * scale for k, v in sd.items()}
        torch.save({"module": module, "config": {"model": source["cfg"].to_dict()}},
                   tag / "mp_rank_00_model_states.pt")  # fmt: skip
    size = (ckpt / "step5/mp_rank_00_model_states.pt").stat().st_size
    (ckpt / "step5/complete.json").write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": size}}))
    (ckpt / "latest").write_text("step10")  # step10 has no complete.json
    out = tmp_path / "o.pt"
    with pytest.warns(UserWarning, match="step10: skipped"):
        assert run_convert("--input", ckpt, "--to", "fp32", "--output", out) == 0
    got = torch.load(out, weights_only=True)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_hf_directory_converts_back_to_the_same_weights(source, tmp_path):
    hf_dir, back = tmp_path / "hf", tmp_path / "back.pth"
    assert run_convert("--input", source["path"], "--to", "hf", "--output", hf_dir) == 0
    assert run_convert("--input", hf_dir, "--to", "rwkv", "--output", back) == 0
    got = torch.load(back, weights_only=True)
    want = source["model"].state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads(back.with_suffix(".json").read_text())["model"]["ctx_len"] == source["cfg"].ctx_len


def test_rescale_every_zero_survives_transformers_inference_and_resave(tmp_path):
    """transformers' default rescale_every=6 divides weights in place at inference; a model saved
    after that holds divided weights and is divided again on the next load. Ours writes 0."""
    from transformers import RwkvForCausalLM

    cfg = ModelConfig(n_layer=12, n_embd=64, vocab_size=300, ctx_len=64, wkv_backend="reference")
    torch.manual_seed(0)
    model = perturb(RWKV(cfg)).eval()
    src = tmp_path / "m12.pt"
    torch.save(model.state_dict(), src)
    ids = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(0))
    ours = our_logits(model, ids)
    diffs = {}
    for rescale in (0, 6):
        hf_dir = tmp_path / f"hf{rescale}"
        assert run_convert("--input", src, "--to", "hf", "--output", hf_dir) == 0
        cfg_file = hf_dir / "config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "rescale_every": rescale}))
        hf = RwkvForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        with torch.no_grad():  # an inference call: rescales in place when rescale_every > 0
            first = hf(ids.unsqueeze(0)).logits[0]
        assert (first - ours).abs().max().item() <= FP32_TOL  # compensated, up to LayerNorm eps
        hf.save_pretrained(str(tmp_path / f"resaved{rescale}"))
        diffs[rescale] = (hf_logits(tmp_path / f"resaved{rescale}", ids) - ours).abs().max().item()
    assert diffs[0] <= FP32_TOL
    assert diffs[6] > 0.1  # measured 2.18


# ------------------------------------------------------------------------------------ RWKV-7
@pytest.fixture(scope="module")
def source7(tmp_path_factory, demo_tokenizer) -> dict:
    """A perturbed 2-layer RWKV-7 model (2 x 64, one head) saved as a plain state dict, config beside it."""
    from data_prep.tokenizer import load_tokenizer

    vocab = load_tokenizer(str(demo_tokenizer)).vocab_size
    cfg = ModelConfig(arch="rwkv7", n_layer=2, n_embd=64, vocab_size=vocab, ctx_len=64,
                      wkv_backend="reference")
    torch.manual_seed(0)
    model = perturb(RWKV(cfg), seed=1).eval()
    d = tmp_path_factory.mktemp("convert_src7")
    path = d / "model.pt"
    torch.save(model.state_dict(), path)
    (d / "model.json").write_text(json.dumps({"model": cfg.to_dict(), "tokenizer": str(demo_tokenizer)}))
    return {"path": path, "model": model, "cfg": cfg}


def test_rwkv7_bare_pth_is_inferred_from_tensor_names_and_runs_in_the_rwkv_package(source7, text_ids,
                                                                                   tmp_path):
    """A .pth with no config beside it (as RWKV-LM writes them): RWKV-7 from its tensor names, its sizes
    from the shapes; the converted .pth gives our logits in the `rwkv` package (RWKV_V7_ON=1)."""
    bare = tmp_path / "bare.pth"
    shutil.copy(source7["path"], bare)
    out = tmp_path / "bare_rwkv.pth"
    with pytest.warns(UserWarning, match="inferred from tensor shapes"):
        assert run_convert("--input", bare, "--to", "rwkv", "--output", out) == 0
    side = json.loads(out.with_suffix(".json").read_text())["model"]
    cfg = source7["cfg"]
    assert side["arch"] == "rwkv7"
    for k in ("n_layer", "n_embd", "dim_ffn", "head_size", "dim_w_lora", "dim_a_lora", "dim_v_lora",
              "dim_g_lora", "vocab_size"):
        assert side[k] == getattr(cfg, k), k
    theirs = convert.rwkv_package_logits(out, text_ids, "rwkv7")
    assert (theirs - our_logits(source7["model"], text_ids)).abs().max().item() <= FP32_TOL

    got = torch.load(out, weights_only=True)
    want = source7["model"].state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_rwkv7_fp32_and_bf16_outputs(source7, text_ids, tmp_path):
    fp32, bf16 = tmp_path / "m.pt", tmp_path / "m_bf16.pth"
    assert run_convert("--input", source7["path"], "--to", "fp32", "--output", fp32) == 0
    got, want = torch.load(fp32, weights_only=True), source7["model"].state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads(fp32.with_suffix(".json").read_text())["model"]["arch"] == "rwkv7"

    assert run_convert("--input", source7["path"], "--to", "rwkv", "--output", bf16, "--dtype", "bf16") == 0
    sd = torch.load(bf16, weights_only=True)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    # The package on the bf16 file = our model on the same weights rounded to bf16 (the perturbed RWKV-7
    # model moves its logits by ~4% of the largest under that rounding, more than RWKV-4's bound above)
    want_sd = source7["model"].state_dict()
    assert all(torch.equal(sd[k], want_sd[k].to(torch.bfloat16)) for k in want_sd)
    rounded = RWKV(source7["cfg"]).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in want_sd.items()})
    theirs = convert.rwkv_package_logits(bf16, text_ids, "rwkv7")
    assert (theirs - our_logits(rounded, text_ids)).abs().max().item() <= FP32_TOL
    assert (theirs - our_logits(source7["model"], text_ids)).abs().max().item() > 0  # the cast happened


def test_rwkv7_truncated_pth_is_refused_naming_the_file(source7, tmp_path, capsys):
    bad = tmp_path / "cut.pth"
    data = source7["path"].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    for to in ("rwkv", "hf"):
        out = tmp_path / f"o_{to}"
        assert run_convert("--input", bad, "--to", to, "--output", out) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and ("truncated" in err or "corrupt" in err)
        assert not out.exists()


# ------------------------------------------------------------------------------------ RWKV-5 / RWKV-6
@pytest.fixture(scope="module", params=["rwkv5", "rwkv6"])
def source56(request, tmp_path_factory, demo_tokenizer) -> dict:
    """A perturbed 2-layer RWKV-5 or RWKV-6 model (2 x 64, one head) saved as a plain state dict,
    config beside it."""
    from data_prep.tokenizer import load_tokenizer

    vocab = load_tokenizer(str(demo_tokenizer)).vocab_size
    cfg = ModelConfig(arch=request.param, n_layer=2, n_embd=64, vocab_size=vocab, ctx_len=64,
                      wkv_backend="reference")
    torch.manual_seed(0)
    model = perturb(RWKV(cfg), seed=1).eval()
    d = tmp_path_factory.mktemp(f"convert_src_{request.param}")
    path = d / "model.pt"
    torch.save(model.state_dict(), path)
    (d / "model.json").write_text(json.dumps({"model": cfg.to_dict(), "tokenizer": str(demo_tokenizer)}))
    return {"path": path, "model": model, "cfg": cfg}


def test_rwkv56_bare_pth_is_inferred_verified_and_runs_in_the_rwkv_package(source56, text_ids, tmp_path,
                                                                           capsys):
    """A .pth with no config beside it (as RWKV-LM writes them): the generation from its tensor names, its
    sizes (x060 LoRA widths too) from the shapes; --verify runs the output in the `rwkv` package."""
    bare = tmp_path / "bare.pth"
    shutil.copy(source56["path"], bare)
    out = tmp_path / "bare_rwkv.pth"
    with pytest.warns(UserWarning, match="inferred from tensor shapes"):
        assert run_convert("--input", bare, "--to", "rwkv", "--output", out, "--verify") == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("verify:")][0]
    assert float(line.split("=")[1].split()[0]) <= FP32_TOL
    side = json.loads(out.with_suffix(".json").read_text())["model"]
    cfg = source56["cfg"]
    assert side["arch"] == cfg.arch
    for k in ("n_layer", "n_embd", "dim_ffn", "head_size", "dim_mix_lora", "dim_decay_lora", "vocab_size"):
        assert side[k] == getattr(cfg, k), k
    theirs = convert.rwkv_package_logits(out, text_ids, cfg.arch)
    assert (theirs - our_logits(source56["model"], text_ids)).abs().max().item() <= FP32_TOL
    got, want = torch.load(out, weights_only=True), source56["model"].state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_rwkv56_hf_output_is_refused_saying_there_is_no_hf_format(source56, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run_convert("--input", source56["path"], "--to", "hf", "--output", out) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face format" in err and "--to rwkv" in err
    assert not (out / "model.safetensors").exists()
