"""Bad input through the real commands: each must stop before any work with one line naming the file
and the problem, exit status 2 and no traceback; and never write a result that drops data.

Every case runs the command line (`sys.executable -m ...`), as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
UNWRITABLE = "/proc/rwkv-no-such-dir"  # procfs refuses new entries, even to root


def run(module: str, *args, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The command failed the way a user should see it: status 2, one error line, no traceback."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "plain-file"
    f.write_text("not a directory\n")
    return f


# ------------------------------------------------------------------------------------ data_prep


def test_prep_refuses_an_unwritable_output_prefix_before_any_work(tmp_path, demo_corpus):
    # the tokenizer does not exist either: the output is what must be named, so it was checked first
    for prefix in (f"{UNWRITABLE}/out", a_file(tmp_path) / "out"):
        r = run("data_prep", "--input", *demo_corpus, "--tokenizer", tmp_path / "no-tokenizer.model",
                "--output-prefix", prefix, "--workers", "1", "--no-progress")
        line = error_line(r)
        assert f"{prefix}.manifest.json" in line and "cannot write the token shards" in line


def test_prep_of_an_empty_file_writes_nothing_and_fails(tmp_path, demo_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    r = run("data_prep", "--input", empty, "--tokenizer", demo_tokenizer,
            "--output-prefix", tmp_path / "out", "--workers", "1", "--no-progress")
    line = error_line(r)
    assert "no documents written" in line and "hold no records" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]  # no shard, no manifest, no state


def test_prep_of_only_bad_records_fails_with_the_skip_counts(tmp_path, demo_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": ""}\n{"text": 42}\n{"broken\n{"text": "  "}\n')  # 2 empty, 1 number, 1 json
    r = run("data_prep", "--input", bad, "--tokenizer", demo_tokenizer,
            "--output-prefix", tmp_path / "out", "--workers", "1", "--no-progress")
    line = error_line(r)
    assert "all 4 records read were skipped" in line
    assert "empty_text=2" in line and "non_string_text=1" in line and "invalid_json=1" in line
    assert not (tmp_path / "out.manifest.json").exists() and not (tmp_path / "out.bin").exists()


def test_manifest_records_the_largest_token_id(tmp_path, demo_corpus, demo_tokenizer):
    r = run("data_prep", "--input", *demo_corpus, "--tokenizer", demo_tokenizer,
            "--output-prefix", tmp_path / "d", "--shards", "2", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "d.manifest.json").read_text())
    # independent of our reader: the raw .bin files as uint16
    per_shard = [int(np.fromfile(tmp_path / f"d_{k:05d}.bin", dtype=np.uint16).max()) for k in range(2)]
    assert [s["max_token_id"] for s in m["shards"]] == per_shard
    assert m["max_token_id"] == max(per_shard)


def test_prep_node_without_input_files_fails(tmp_path, demo_corpus, demo_tokenizer):
    # 2 files over 3 nodes: node 0 gets none (nodes split the file list, not the records)
    r = run("data_prep", "--input", *demo_corpus, "--tokenizer", demo_tokenizer, "--output-prefix",
            tmp_path / "out", "--num-nodes", "3", "--node-rank", "0", "--workers", "1", "--no-progress")
    line = error_line(r)
    assert "--node-rank 0 of --num-nodes 3 got none of the input files" in line
    assert not list(tmp_path.glob("out*"))


def test_old_manifests_without_max_token_id_still_load_and_merge(tmp_path, demo_shards):
    from conftest import DEMO_VOCAB_SIZE

    from train.data import TokenWindows

    manifest, m = copy_dataset(demo_shards, tmp_path / "data")
    m.pop("max_token_id")
    for shard in m["shards"]:
        shard.pop("max_token_id")
    manifest.write_text(json.dumps(m))
    TokenWindows([manifest], ctx_len=64, val_documents=8).limit_vocab(DEMO_VOCAB_SIZE)
    r = run("data_prep", "merge", "--output", tmp_path / "merged.manifest.json", manifest, demo_shards)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "merged.manifest.json").read_text())["max_token_id"] is None


def test_merge_refuses_an_unwritable_output(tmp_path, demo_shards):
    out = f"{UNWRITABLE}/merged.manifest.json"
    line = error_line(run("data_prep", "merge", "--output", out, demo_shards))
    assert out in line and "merged manifest" in line


def test_train_tokenizer_refuses_an_unwritable_model_prefix(tmp_path, demo_corpus):
    r = run("data_prep.train_tokenizer", "--input", demo_corpus[0], "--model-prefix", f"{UNWRITABLE}/tok")
    line = error_line(r)
    assert f"{UNWRITABLE}/tok.model" in line and "tokenizer model" in line


def test_train_tokenizer_on_an_empty_corpus_says_so(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b'{"text": ""}\n')
    line = error_line(run("data_prep.train_tokenizer", "--input", empty, "--model-prefix", tmp_path / "tok"))
    assert str(empty) in line and "no text to train on" in line
    assert not (tmp_path / "tok.model").exists()


# ---------------------------------------------------------------------------- launch.convert, generate

SMALL_VOCAB = 300  # below the demo tokenizer's 2048, so its ids can fall outside the model's vocabulary


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    """The tiny preset's state dict (4 layers x 128), as the model itself names and shapes it."""
    from train.config import ModelConfig
    from train.model import RWKV

    torch.manual_seed(0)
    return RWKV(ModelConfig.from_preset("tiny", vocab_size=SMALL_VOCAB)).state_dict()


def save_weights(d: Path, sd: dict[str, torch.Tensor], tokenizer: str | None = None) -> Path:
    """A state dict with its model config beside it (as launch.convert and the trainer write them)."""
    from train.config import ModelConfig

    d.mkdir(parents=True, exist_ok=True)
    path = d / "model.pth"
    torch.save(sd, path)
    side: dict = {"model": ModelConfig.from_preset("tiny", vocab_size=SMALL_VOCAB).to_dict()}
    if tokenizer:
        side["tokenizer"] = {"spec": tokenizer}
    (d / "model.json").write_text(json.dumps(side))
    return path


@pytest.mark.parametrize("dropped, to, extra", [
    ("blocks.3.ffn.value.weight", "rwkv", []),
    ("blocks.3.att.time_first", "hf", []),
    ("blocks.1.att.key.weight", "fp32", ["--verify"]),
])
def test_convert_refuses_weights_missing_a_tensor_of_a_middle_layer(tmp_path, tiny_sd, dropped, to, extra):
    src = save_weights(tmp_path / "src", {k: v for k, v in tiny_sd.items() if k != dropped})
    out = tmp_path / "out"
    line = error_line(run("launch.convert", "--input", src, "--to", to, "--output", out, *extra))
    assert "missing 1: " + dropped in line and str(src) in line
    assert not list(tmp_path.glob("out*"))  # nothing written


def test_convert_refuses_rwkv7_weights_missing_or_misshapen_naming_them(tmp_path):
    """RWKV-7 without a config beside it (the architecture from its tensor names): a dropped LoRA
    factor, a misshapen r_k and an RWKV-4 tensor among RWKV-7 ones are each named."""
    from train.config import ModelConfig
    from train.model import RWKV

    torch.manual_seed(0)
    sd = RWKV(ModelConfig(arch="rwkv7", n_layer=2, n_embd=64, vocab_size=SMALL_VOCAB)).state_dict()
    for name, bad, want in (
        ("dropped", {k: v for k, v in sd.items() if k != "blocks.1.att.v1"}, "missing 1: blocks.1.att.v1"),
        ("misshapen", {**sd, "blocks.1.att.r_k": torch.zeros(2, 32)},
         "misshapen 1: blocks.1.att.r_k (2, 32) (expected (1, 64))"),
        ("mixed", {**sd, "blocks.0.att.time_decay": torch.zeros(64)},
         "unexpected 1: blocks.0.att.time_decay"),
    ):
        src = tmp_path / f"{name}.pth"
        torch.save(bad, src)
        out = tmp_path / f"o_{name}"
        line = error_line(run("launch.convert", "--input", src, "--to", "hf", "--output", out))
        assert "RWKV-7 2 layers x 64" in line and want in line and str(src) in line
    assert not list(tmp_path.glob("o_*"))


def test_convert_refuses_rwkv6_weights_missing_and_misshapen_naming_them(tmp_path):
    """RWKV-6 told from its tensor names; a dropped LoRA factor and a misshapen LoRA width (the width is
    read from layer 0, so layer 1's is wrong) are both named, in one conversion."""
    from train.config import ModelConfig
    from train.model import RWKV

    sd = RWKV(ModelConfig(arch="rwkv6", n_layer=2, n_embd=64, vocab_size=SMALL_VOCAB)).state_dict()
    bad = {k: v for k, v in sd.items() if k != "blocks.1.att.time_maa_w2"}
    bad["blocks.1.att.time_decay_w1"] = torch.zeros(64, 32)
    src = tmp_path / "bad6.pth"
    torch.save(bad, src)
    line = error_line(run("launch.convert", "--input", src, "--to", "rwkv", "--output", tmp_path / "o6"))
    assert "RWKV-6 2 layers x 64" in line and str(src) in line
    assert "missing 1: blocks.1.att.time_maa_w2" in line
    assert "misshapen 1: blocks.1.att.time_decay_w1 (64, 32) (expected (64, 64))" in line
    assert not list(tmp_path.glob("o6*"))


def test_convert_lists_every_tensor_of_a_dropped_last_layer(tmp_path, tiny_sd):
    # the recorded config says 4 layers; without the check the output was a 3-layer model
    last = [k for k in tiny_sd if k.startswith("blocks.3.")]
    src = save_weights(tmp_path / "src", {k: v for k, v in tiny_sd.items() if k not in last})
    line = error_line(run("launch.convert", "--input", src, "--to", "rwkv", "--output", tmp_path / "o"))
    assert f"missing {len(last)}: " in line and all(k in line for k in last)


def test_convert_reports_misshapen_and_unexpected_tensors(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["blocks.2.ffn.key.weight"] = torch.zeros(256, 128)  # the tiny preset's is 512 x 128
    sd["blocks.2.att.extra"] = torch.zeros(3)
    src = save_weights(tmp_path / "src", sd)
    line = error_line(run("launch.convert", "--input", src, "--to", "fp32", "--output", tmp_path / "o.pt"))
    assert "blocks.2.ffn.key.weight (256, 128) (expected (512, 128))" in line
    assert "unexpected 1: blocks.2.att.extra" in line


def test_convert_refuses_an_unknown_tensor_in_a_hugging_face_directory(tmp_path, tiny_sd):
    from safetensors.torch import load_file, save_file

    from launch.convert import convert

    hf = convert(save_weights(tmp_path / "src", tiny_sd), "hf", tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    tensors["rwkv.blocks.1.attention.mystery"] = torch.zeros(2)
    save_file(tensors, str(hf / "model.safetensors"))
    line = error_line(run("launch.convert", "--input", hf, "--to", "rwkv", "--output", tmp_path / "o"))
    assert "unexpected 1: rwkv.blocks.1.attention.mystery" in line


def test_convert_refuses_a_cast_that_overflows_fp16(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["blocks.0.att.time_decay"] = torch.full_like(sd["blocks.0.att.time_decay"], 1e5)  # fp16 max: 65504
    src = save_weights(tmp_path / "src", sd)
    line = error_line(run("launch.convert", "--input", src, "--to", "rwkv", "--output", tmp_path / "o",
                          "--dtype", "fp16"))
    assert "blocks.0.att.time_decay" in line and "fp16" in line
    assert not list(tmp_path.glob("o*"))


def test_convert_refuses_a_model_config_file_that_does_not_exist(tmp_path, tiny_sd):
    src = save_weights(tmp_path / "src", tiny_sd)
    missing = tmp_path / "nonexistent.json"
    line = error_line(run("launch.convert", "--input", src, "--model-config", missing, "--to", "fp32",
                          "--output", tmp_path / "o.pt"))
    assert f"{missing}: model config file not found" in line
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("to", ["rwkv", "hf"])
def test_convert_refuses_an_unwritable_output_before_loading(tmp_path, to):
    # the input does not exist either: the output is what must be named, so it was checked first
    outs = [f"{UNWRITABLE}/y.pth", a_file(tmp_path) / "y.pth"] + ([a_file(tmp_path)] if to == "hf" else [])
    for out in outs:
        r = run("launch.convert", "--input", tmp_path / "none.pth", "--to", to, "--output", out)
        line = error_line(r)
        assert str(out) in line and "cannot write the" in line


def test_generate_refuses_an_unwritable_score_json(tmp_path, tiny_sd, demo_tokenizer):
    src = save_weights(tmp_path / "src", tiny_sd, demo_tokenizer)
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be")
    out = f"{UNWRITABLE}/losses.json"
    line = error_line(run("launch.generate", "--weights", src, "--score", text, "--score-json", out))
    assert out in line and "--score-json" in line


def test_generate_refuses_token_ids_beyond_the_models_vocabulary(tmp_path, tiny_sd, demo_tokenizer):
    from data_prep.tokenizer import load_tokenizer

    src = save_weights(tmp_path / "src", tiny_sd, demo_tokenizer)
    text = tmp_path / "t.txt"
    text.write_text("Wherefore art thou Romeo? Deny thy father and refuse thy name.")
    top = max(load_tokenizer(demo_tokenizer).encode(text.read_text()))
    assert top >= SMALL_VOCAB  # the case under test: ids the model has no embedding for
    line = error_line(run("launch.generate", "--weights", src, "--score", text))
    assert f"token id {top}" in line and f"vocabulary of {SMALL_VOCAB}" in line and str(text) in line
    line = error_line(run("launch.generate", "--weights", src, "--prompt", text.read_text()))
    assert f"token id {top}" in line and "--prompt" in line




def test_inspect_names_a_token_id_its_tokenizer_cannot_decode(tmp_path, demo_shards):
    from conftest import DEMO_VOCAB_SIZE

    manifest, m = copy_dataset(demo_shards, tmp_path / "data")
    prefix = tmp_path / "data" / m["shards"][0]["prefix"]
    ids = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    ids[5] = 60000  # inside document 0 (demo documents are >100 tokens), past the vocabulary
    ids.tofile(f"{prefix}.bin")
    line = error_line(run("data_prep", "inspect", manifest))
    assert f"{prefix}: document 0 holds token id 60000" in line and f"vocabulary of {DEMO_VOCAB_SIZE}" in line


# ------------------------------------------------------------------------------------ train

TINY = REPO / "configs" / "tiny.yaml"


def train_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def train(manifest: Path | str, run_dir: Path | str, *sets: str, timeout: int = 300
          ) -> subprocess.CompletedProcess:
    args = ["--config", TINY, "--set", f"data.manifests=[{manifest}]", "--set", f"run_dir={run_dir}",
            "--set", "log.progress=false", "--set", "log.tensorboard=false"]
    for s in sets:
        args += ["--set", s]
    return run("train", *args, timeout=timeout, env=train_env())


def copy_dataset(manifest: str, into: Path) -> tuple[Path, dict]:
    """A copy of a prepared dataset (manifest + shards) that a test may damage."""
    into.mkdir(parents=True, exist_ok=True)
    m = json.loads(Path(manifest).read_text())
    for shard in m["shards"]:
        for suffix in (".bin", ".idx"):
            name = f"{shard['prefix']}{suffix}"
            shutil.copy(Path(manifest).parent / name, into / name)
    out = into / Path(manifest).name
    out.write_text(json.dumps(m))
    return out, m


def test_train_refuses_an_unwritable_run_dir_before_deepspeed_starts(tmp_path, demo_shards):
    for run_dir in (f"{UNWRITABLE}/run", a_file(tmp_path)):
        r = train(demo_shards, run_dir)
        line = error_line(r)
        assert str(run_dir) in line and "run_dir" in line
        assert "deepspeed" not in (r.stdout + r.stderr).lower()


def test_train_refuses_a_manifest_whose_token_ids_exceed_the_vocabulary(tmp_path, demo_shards):
    from conftest import DEMO_VOCAB_SIZE

    manifest, m = copy_dataset(demo_shards, tmp_path / "data")
    m["shards"][0]["max_token_id"] = DEMO_VOCAB_SIZE + 100  # as a prep run with a larger tokenizer records
    manifest.write_text(json.dumps(m))
    line = error_line(train(manifest, tmp_path / "run"))
    assert f"token id {DEMO_VOCAB_SIZE + 100}" in line and f"vocabulary of {DEMO_VOCAB_SIZE}" in line
    assert m["shards"][0]["prefix"] in line


@pytest.mark.slow
def test_train_refuses_a_shard_of_the_right_size_with_ids_past_the_vocabulary(tmp_path, demo_shards):
    """The manifest is fine and the files have the right sizes, but every token reads 0xFFFF."""
    from conftest import DEMO_VOCAB_SIZE

    manifest, m = copy_dataset(demo_shards, tmp_path / "data")
    bins = [tmp_path / "data" / f"{s['prefix']}.bin" for s in m["shards"]]
    for b in bins:
        b.write_bytes(b"\xff" * b.stat().st_size)
    line = error_line(train(manifest, tmp_path / "run", "train.steps=2", "eval.every=0"))
    assert "token id 65535" in line and f"vocabulary of {DEMO_VOCAB_SIZE}" in line
    assert any(str(b)[: -len(".bin")] in line for b in bins)


def test_train_says_the_dataset_is_empty(tmp_path, demo_tokenizer):
    from data_prep.binidx import BinIdxWriter
    from data_prep.tokenizer import load_tokenizer

    d = tmp_path / "data"
    d.mkdir()
    BinIdxWriter(d / "empty", np.uint16).finish()  # what older data_prep versions wrote for no documents
    manifest = d / "empty.manifest.json"
    manifest.write_text(json.dumps({"tokenizer": load_tokenizer(demo_tokenizer).describe(), "dtype": "uint16",
                                    "shards": [{"prefix": "empty", "documents": 0, "tokens": 0}]}))
    line = error_line(train(manifest, tmp_path / "run"))
    assert "hold no documents" in line and "val_documents" not in line


def test_train_says_how_far_to_lower_val_documents(tmp_path, demo_shards):
    last = json.loads(Path(demo_shards).read_text())["shards"][-1]["documents"]
    line = error_line(train(demo_shards, tmp_path / "run", f"data.val_documents={last}"))
    assert f"every one of the {last} documents" in line and f"at most {last - 1}" in line
