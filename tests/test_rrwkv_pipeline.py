"""RRWKV through the pipeline's tools: convert (our .pth layout + .json, fp32 state dict; no HF, and a
clear word that the `rwkv` package cannot load it), generate and score from the converted weights."""

from __future__ import annotations

import json

import pytest
import torch
from weights import corpus_text, perturb

from launch import convert, generate
from launch.generate import generate_ids, score_ids
from train.config import ModelConfig
from train.model import RWKV


@pytest.fixture(scope="module")
def source(tmp_path_factory, demo_tokenizer) -> dict:
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(str(demo_tokenizer))
    cfg = ModelConfig(arch="rrwkv", n_layer=2, n_embd=64, vocab_size=tok.vocab_size, ctx_len=32,
                      medium_every=8, wkv_backend="reference")
    torch.manual_seed(0)
    model = perturb(RWKV(cfg), seed=2).eval()
    d = tmp_path_factory.mktemp("rrwkv_src")
    torch.save(model.state_dict(), d / "model.pt")
    (d / "model.json").write_text(json.dumps({"model": cfg.to_dict(), "tokenizer": str(demo_tokenizer)}))
    return {"path": d / "model.pt", "model": model, "tok": tok}


def test_converts_to_our_layout_says_the_rwkv_package_cannot_load_it_and_refuses_hf(source, tmp_path, capsys):
    pth, fp32 = tmp_path / "m.pth", tmp_path / "m_fp32.pt"
    src = str(source["path"])
    assert convert.main(["--input", src, "--to", "rwkv", "--output", str(pth), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "the `rwkv` package cannot load it" in out and "reads the file back with our loader" in out
    assert float(out.split("max |logit diff| = ")[1].split()[0]) == 0.0
    side = json.loads(pth.with_suffix(".json").read_text())["model"]
    assert side["arch"] == "rrwkv" and side["medium_every"] == 8
    assert convert.main(["--input", str(source["path"]), "--to", "fp32", "--output", str(fp32)]) == 0
    got = torch.load(fp32)
    want = source["model"].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert convert.main(["--input", str(source["path"]), "--to", "hf", "--output", str(tmp_path / "hf")]) == 2
    assert "RRWKV has no Hugging Face model" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_generates_and_scores_from_the_converted_pth(source, tmp_path, capsys):
    """generate.py on the .pth gives the tokens that sampling the parallel-mode logits gives (the RNN
    mode it runs is checked against the parallel mode in test_model_rrwkv), and --score gives the
    cross-entropy of the parallel logits computed here."""
    pth = tmp_path / "m.pth"
    assert convert.main(["--input", str(source["path"]), "--to", "rwkv", "--output", str(pth)]) == 0
    tok, model = source["tok"], source["model"]
    prompt = tok.encode("ROMEO.")
    new = generate_ids(model, prompt, 20, temperature=1e-4, seed=1)  # ~greedy
    with torch.no_grad():
        full = model(torch.tensor([prompt + new]))[0]
    greedy = full[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert new == greedy
    capsys.readouterr()
    assert generate.main(["--weights", str(pth), "--prompt", "ROMEO.", "--max-tokens", "20",
                          "--temperature", "1e-4", "--seed", "1"]) == 0
    text_out = tok.decode(prompt + [t for t in new if t != tok.eod_id])
    assert capsys.readouterr().out.strip() == ("ROMEO." + text_out[len(tok.decode(prompt)) :]).strip()
    text = tmp_path / "t.txt"
    text.write_text(corpus_text(300, shard="01"), encoding="utf-8")
    assert generate.main(["--weights", str(pth), "--score", str(text)]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    ids = tok.encode(text.read_text(encoding="utf-8"))
    expected = score_ids(model, ids, window=model.cfg.ctx_len).perplexity
    with torch.no_grad():
        logits = model(torch.tensor([ids[:33]]))[0]
    first = torch.nn.functional.cross_entropy(logits[:32], torch.tensor(ids[1:33]), reduction="none")
    assert first.tolist() == pytest.approx(score_ids(model, ids[:33]).token_losses, abs=1e-5)
    assert ppl == pytest.approx(expected, rel=1e-5)
