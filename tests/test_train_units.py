"""Trainer components without processes: config, DeepSpeed auto fields, data order, LR, param groups."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import TokenWindows, magic_prime
from train.distributed import detect, first_slurm_host
from train.ds_config import fill_ds_config, load_ds_config
from train.metrics import truncate_metrics
from train.optim import LR_SCALE_KEY, apply_lr, param_groups
from train.run_config import ConfigError, load_run_config
from train.schedule import lr_at
from train.trainer import plan

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def tiny(manifest: str, *overrides: str):
    return load_run_config(TINY, [f"data.manifests=[{manifest}]", *overrides])


# ------------------------------------------------------------------------------------ run config
def test_overrides_types_and_unknown_keys(tmp_path):
    sets = ["train.steps=7", "optim.lr_init=1e-3", "model.n_layer=3", "optim.betas=[0.8,0.9]"]
    cfg = load_run_config(TINY, sets)
    assert cfg.train.steps == 7 and cfg.optim.lr_init == 1e-3
    assert cfg.model.overrides["n_layer"] == 3 and cfg.optim.betas == [0.8, 0.9]
    with pytest.raises(ConfigError, match=r"train.*unknown key.*stepz"):
        load_run_config(TINY, ["train.stepz=7"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_run_config(TINY, ["train.steps=many"])
    with pytest.raises(ConfigError, match="precision"):
        load_run_config(TINY, ["train.precision=fp8"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match=f"{bad}.*section 'train' must be a mapping"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_run_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------ ds_config autos
def test_ds_config_auto_filled_and_contradictions_refused(tmp_path):
    cfg = load_run_config(TINY, ["train.grad_accum=3", "train.precision=bf16", "optim.name=adam"])
    ds = fill_ds_config(load_ds_config(REPO / "ds_config.json"), cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in ds["zero_optimization"]
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.99] and ds["optimizer"]["params"]["eps"] == 1e-8
    # Offload on: the "auto" device becomes cpu.
    cfg_off = load_run_config(TINY, ["train.offload_optimizer=true", "optim.name=adam"])
    ds_off = fill_ds_config(load_ds_config(REPO / "ds_config.json"), cfg_off, world_size=2)
    assert ds_off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # An explicit value that disagrees with the run config is an error naming the key and the file.
    explicit = json.loads((REPO / "ds_config.json").read_text())
    explicit["train_batch_size"] = 7
    with pytest.raises(ConfigError, match=r"x\.json: train_batch_size is 7 but the run config implies 24"):
        fill_ds_config(explicit, cfg, world_size=2, origin="x.json")
    explicit = json.loads((REPO / "ds_config.json").read_text())
    explicit["zero_optimization"]["stage"] = 3
    with pytest.raises(ConfigError, match="zero_optimization.stage is 3"):
        fill_ds_config(explicit, cfg, world_size=2)


# ------------------------------------------------------------------------------------ bad configs
def test_bad_configs_are_refused_before_training(demo_shards, tmp_path):
    # a retired key is refused with what replaced it; a window longer than model.ctx_len is fine
    # (the kernel has no length bound), and the kernel's chunk length is a model setting
    with pytest.raises(ConfigError, match="train.wkv_chunking is no longer a setting: .*model.wkv_chunk_len"):
        plan(tiny(demo_shards, "train.wkv_chunking=true"), world_size=2)
    p = plan(tiny(demo_shards, "model.ctx_len=32", "train.ctx_len=64", "model.wkv_chunk_len=16"), 2)
    assert (p.model_cfg.ctx_len, p.model_cfg.wkv_chunk_len) == (32, 16)
    # a global batch the world cannot split
    with pytest.raises(ConfigError, match=r"global_batch_size 12 is not divisible by .* world size 2"):
        plan(tiny(demo_shards, "train.global_batch_size=12"), world_size=2)
    p = plan(tiny(demo_shards, "train.global_batch_size=16"), world_size=2)
    assert p.cfg.train.grad_accum == 2 and p.ds["train_batch_size"] == 16
    # tokenizer vocabulary larger than the model's
    with pytest.raises(ConfigError, match="tokenizer has 2048 tokens but the model's vocab_size is 1000"):
        plan(tiny(demo_shards, "model.vocab_size=1000"), world_size=2)
    # missing data
    missing = tmp_path / "missing.manifest.json"
    with pytest.raises(ConfigError, match=f"{missing}: file not found"):
        plan(tiny(str(missing)), world_size=2)
    # mismatched data: a manifest that does not describe its shards, and mixed tokenizers
    src = Path(demo_shards)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    manifest = json.loads(src.read_text())
    for shard in manifest["shards"]:
        for ext in (".bin", ".idx"):
            shutil.copy(src.parent / (shard["prefix"] + ext), copy_dir / (shard["prefix"] + ext))
    manifest["shards"][1]["tokens"] += 5
    bad = copy_dir / "bad.manifest.json"
    bad.write_text(json.dumps(manifest))
    msg = r"bad\.manifest\.json: shard .*_00001 has \d+ tokens, the manifest says"
    with pytest.raises(ConfigError, match=msg):
        plan(tiny(str(bad)), world_size=2)
    manifest["shards"][1]["tokens"] -= 5
    manifest["tokenizer"]["identity"] = "other-tokenizer"
    other = copy_dir / "other.manifest.json"
    other.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="must use the same tokenizer"):
        plan(load_run_config(TINY, [f"data.manifests=[{demo_shards},{other}]"]), world_size=2)
    # a truncated shard
    (copy_dir / (manifest["shards"][0]["prefix"] + ".bin")).write_bytes(b"\0" * 10)
    with pytest.raises(ConfigError, match=r"_00000.bin.*truncated"):
        plan(tiny(str(other)), world_size=2)


# ------------------------------------------------------------------------------------ data order
def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def test_magic_prime_matches_definition():
    for n in (5, 17, 100, 1000, 25146):
        p = magic_prime(n)
        assert p <= n and p % 3 == 2 and _is_prime(p)
        assert not any(q % 3 == 2 and _is_prime(q) for q in range(p + 1, n + 1))


def test_windows_are_a_permutation_disjoint_across_ranks(demo_shards):
    data = TokenWindows([Path(demo_shards)], ctx_len=64, val_documents=8)
    p = data.prime
    chunks = [data.chunk_of(g) for g in range(p)]
    assert sorted(chunks) == list(range(p))  # one epoch reads every chunk once
    assert sorted(data.chunk_of(g) for g in range(p, 2 * p)) == list(range(p))
    assert chunks[: 50] != [data.chunk_of(g) for g in range(p, p + 50)]  # next epoch: another order

    # Independent reading of the shards: chunk c of the concatenated training tokens.
    from data_prep.binidx import MMapIndexedDataset
    from data_prep.manifest import load_manifest

    shards = [MMapIndexedDataset(s["prefix"]) for s in load_manifest(demo_shards)["shards"]]
    first_chunks = (shards[0].n_tokens - 1) // 64
    for c in (0, 5, first_chunks - 1, first_chunks, first_chunks + 3):
        s, local = (0, c) if c < first_chunks else (1, c - first_chunks)
        np.testing.assert_array_equal(data.window(c), shards[s].tokens[local * 64 : local * 64 + 65])

    # Ranks read disjoint samples; (world 2, grad_accum 1) and (world 1, grad_accum 2) read the same
    # global batch, which is what makes a resume at another world size continue the same data.
    two = [data.batch(3, 0, r, 2, 4, 1) for r in range(2)]
    one = [data.batch(3, m, 0, 1, 4, 2) for m in range(2)]
    rows2 = {tuple(x.tolist()) for b in two for x in b}
    assert len(rows2) == 8
    assert rows2 == {tuple(x.tolist()) for b in one for x in b}

    # Validation windows come from the held-out documents only (after every training token).
    last = shards[-1]
    cut = int(last.pointers[len(last) - 8]) // last.dtype.itemsize
    val = data.val_batches(0, 2, 4, 2)
    np.testing.assert_array_equal(val[0][0].numpy(), last.tokens[cut : cut + 65])
    assert data.shards[-1].train_tokens == cut


# ------------------------------------------------------------------------------------ LR and groups
def test_lr_schedule_shapes():
    kw = dict(lr_init=1e-3, lr_final=1e-5, warmup_tokens=100, decay_tokens=1000)
    assert lr_at(50, **kw) == pytest.approx(5e-4)
    assert lr_at(100, **kw, decay="cosine") == pytest.approx(1e-3)
    assert lr_at(600, **kw, decay="cosine") == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(1100, **kw, decay="cosine") == pytest.approx(1e-5)
    # exponential: geometric mean half way, as RWKV-LM's exp(log(final/init) * progress)
    assert lr_at(600, **kw, decay="exponential") == pytest.approx(math.sqrt(1e-3 * 1e-5))
    assert lr_at(5000, **kw, decay="exponential") == pytest.approx(1e-5)


def test_param_groups_follow_rwkv_lm():
    from train.config import ModelConfig
    from train.model import RWKV

    model = RWKV(ModelConfig.from_preset("tiny", vocab_size=64, n_layer=2, n_embd=32))
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1, layerwise_lr=True)}
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert by_group["lr_2x"] == {f"blocks.{i}.att.time_decay" for i in range(2)}
    assert by_group["lr_3x"] == {f"blocks.{i}.att.time_first" for i in range(2)}
    assert by_group["decay"] == {n for n, p in model.named_parameters() if p.squeeze().dim() >= 2}
    assert "blocks.0.att.time_mix_k" in by_group["lr_1x"] and "ln_out.weight" in by_group["lr_1x"]
    assert groups["decay"]["weight_decay"] == 0.1 and groups["lr_1x"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    opt = torch.optim.AdamW(list(groups.values()), lr=1.0)
    apply_lr(opt, 0.5)
    assert sorted(g["lr"] for g in opt.param_groups) == [0.5, 0.5, 1.0, 1.5]
    assert all(g["lr"] == 0.5 * g[LR_SCALE_KEY] for g in opt.param_groups)
    # layerwise off, no weight decay: one plain group
    plain = param_groups(model, weight_decay=0.0, layerwise_lr=False)
    assert len(plain) == 1 and len(plain[0]["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------ launchers
def test_launcher_environment_detection():
    d = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
                "MASTER_PORT": "1234"})
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.launcher) == (
        3, 8, 1, "n0", 1234, "torchrun/deepspeed")
    d = detect({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                "SLURM_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"})
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (9, 16, 1, "slurm")
    assert d.master_addr == "gpu007" and d.master_port == 24242
    d = detect({})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single") and d.master_port > 0
    assert first_slurm_host("a1,b2") == "a1"
    assert first_slurm_host("node[3,5-7],x") == "node3"


def test_metrics_truncated_back_to_resume_step(tmp_path):
    f = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)] + [{"step": 4, "val_loss": 2.0}]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9, "lo')  # cut by a kill
    assert truncate_metrics(f, 4) == 4
    kept = [json.loads(x) for x in f.read_text().splitlines()]
    assert [x["step"] for x in kept] == [1, 2, 3, 4, 4]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_split_their_batch(path):
    from train.config import ModelConfig
    from train.trainer import resolve_batch

    cfg = load_run_config(path)
    overrides = {k: v for k, v in cfg.model.overrides.items() if v != "auto"}
    ModelConfig.from_preset(cfg.model.preset, **overrides)  # sizes are valid
    t = cfg.train
    for world in (8, t.global_batch_size // t.micro_batch_size) if t.global_batch_size else (2,):
        resolve_batch(cfg, world)
        assert cfg.train.grad_accum * cfg.train.micro_batch_size * world == (
            cfg.train.global_batch_size or cfg.train.micro_batch_size * world * cfg.train.grad_accum)
        cfg.train.grad_accum = 1


def _cli(demo_shards: str, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m train` with configs/tiny.yaml on DeepSpeed's CPU accelerator, one plain process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "train", "--config", str(TINY), "--set", f"data.manifests=[{demo_shards}]"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_reports_config_errors_with_exit_status_2(demo_shards):
    out = _cli(demo_shards, "model.vocab_size=1000")
    assert out.returncode == 2
    assert "config error" in out.stderr and "vocab_size is 1000" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------ fp16 on the CPU
# Whether fp16 trains on the CPU is the machine's answer, not ours: DeepSpeed's CPU accelerator says yes
# where oneDNN has fp16 kernels (torch.ops.mkldnn._is_mkldnn_fp16_supported(): CPUs with avx512_fp16 or
# amx_fp16), no elsewhere, and the trainer refuses fp16 exactly where it says no. The CLI tests below
# follow that answer (the same class `DS_ACCELERATOR=cpu` selects in the subprocess); the two in-process
# tests force each answer, so both sides of the trainer's check run on every machine.
def _cpu_fp16_supported() -> bool:
    # asked inside the tests, not at collection: importing deepspeed takes seconds
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    return bool(CPU_Accelerator().is_fp16_supported())


NO_CPU_FP16 = (
    "DeepSpeed's CPU accelerator reports no fp16 on this CPU (oneDNN fp16 needs avx512_fp16 or amx_fp16: "
    "torch.ops.mkldnn._is_mkldnn_fp16_supported() is False)"
)


@pytest.fixture
def forced_fp16(monkeypatch):
    """Sets DeepSpeed's accelerator's fp16 answer for this test; keeps the process environment as it was
    (Trainer exports RANK, WORLD_SIZE, MASTER_PORT, ... for the process group it would start)."""
    from deepspeed.accelerator import get_accelerator

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "")  # records the original value (or its absence) for teardown
        monkeypatch.delenv(k)
    accel = get_accelerator()

    def force(supported: bool):
        monkeypatch.setattr(type(accel), "is_fp16_supported", lambda self: supported)
        return accel

    return force


def test_fp16_refused_with_exit_status_2_where_the_accelerator_has_none(demo_shards, forced_fp16, capsys):
    from train.__main__ import main

    accel = forced_fp16(False)
    rc = main(["--config", str(TINY), "--set", f"data.manifests=[{demo_shards}]",
               "--set", "train.precision=fp16"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "config error" in err and f"fp16 is not supported on {accel.device_name()}" in err
    assert "use bf16 or fp32" in err


def test_fp16_accepted_where_the_accelerator_has_it(demo_shards, forced_fp16):
    from train.trainer import Trainer

    forced_fp16(True)
    trainer = Trainer(tiny(demo_shards, "train.precision=fp16"))  # checks precision; starts no process group
    assert trainer.plan.ds["fp16"]["enabled"] is True and trainer.plan.ds["bf16"]["enabled"] is False


def test_cli_refuses_fp16_on_a_cpu_without_it(demo_shards):
    if _cpu_fp16_supported():
        pytest.skip("this CPU has fp16 (the refusal runs in-process above, with the answer forced)")
    out = _cli(demo_shards, "train.precision=fp16")
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "config error" in out.stderr and "fp16 is not supported on cpu" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_trains_fp16_on_a_cpu_with_it(demo_shards, tmp_path):
    if not _cpu_fp16_supported():
        pytest.skip(NO_CPU_FP16)
    run_dir = tmp_path / "fp16"
    out = _cli(demo_shards, "train.precision=fp16", f"run_dir={run_dir}", "train.steps=3", "eval.every=0",
               "checkpoint.every=0", "log.progress=false", "log.tensorboard=false",
               timeout=600)  # room for first-use builds (DeepSpeed's shm comm op, the WKV CPU twin)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses


def test_validation_batches_equal_on_every_rank(demo_shards):
    data = TokenWindows([Path(demo_shards)], ctx_len=64, val_documents=8)
    for world, micro in ((2, 1), (3, 2), (7, 4)):
        shapes = [[tuple(b.shape) for b in data.val_batches(r, world, micro, 10_000)] for r in range(world)]
        assert all(s == shapes[0] for s in shapes)
        rows = {tuple(x.tolist()) for r in range(world) for b in data.val_batches(r, world, micro, 10_000)
                for x in b}
        assert len(rows) == (data.n_val_windows // world) * world


# ------------------------------------------------------------------------------------ MFU peaks
@pytest.mark.parametrize(
    "name, precision, tf32, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),  # SXM5
        ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9),  # torch's default: no TF32 for matmuls
        ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7),
        ("NVIDIA H100 PCIe", "bf16", False, 756.5),
        ("NVIDIA H100 NVL", "fp16", False, 835.5),
        ("NVIDIA H200", "bf16", False, 989.4),
        ("NVIDIA H200 NVL", "bf16", False, 835.5),
        ("NVIDIA GH200 480GB", "bf16", False, 989.4),
        ("NVIDIA A100-SXM4-40GB", "bf16", False, 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),
        ("NVIDIA A100-PCIE-40GB", "bf16", False, 312.0),
        ("NVIDIA A100 80GB PCIe", "fp32", False, 19.5),
        ("NVIDIA L40S", "bf16", False, 362.05),
        ("NVIDIA L4", "bf16", False, 121.0),
        ("NVIDIA A10", "bf16", False, 125.0),
        ("Tesla V100-SXM2-32GB", "fp16", False, 125.0),
        ("Tesla V100-SXM2-32GB", "bf16", False, None),  # no bf16 tensor cores
        ("NVIDIA A10G", "bf16", False, None),  # no published NVIDIA figure
        ("NVIDIA GeForce RTX 4090", "bf16", False, None),
    ],
)
def test_peak_tflops_by_exact_device_model(name, precision, tf32, expected):
    from train.metrics import device_peak_tflops

    assert device_peak_tflops(name, precision, tf32) == expected


def test_peak_tflops_configured_cpu_and_unknown():
    from train.metrics import mfu, peak_tflops

    assert peak_tflops(500.0, torch.device("cuda", 0), "bf16") == 500.0  # log.peak_tflops wins
    assert peak_tflops(0.0, torch.device("cpu"), "fp32") == 1.0  # nominal, relative figure only
    assert peak_tflops(0.0, torch.device("meta"), "bf16") is None
    assert mfu(1000.0, 1e9, 2, None) is None
    assert mfu(1000.0, 1e9, 2, 1.0) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ non-finite guard
def test_gradient_gate_keeps_nan_out_of_parameter_gradients():
    from train.nonfinite import GradientGate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    good, bad = torch.randn(2, 4), torch.randn(2, 4)
    bad[0, 0] = float("nan")  # a NaN inside the forward pass
    # Why a gate: zeroing the loss does not zero the gradient of a NaN graph (0 * NaN = NaN).
    (model(bad).sum() * 0.0).backward()
    assert torch.isnan(model[2].weight.grad).any() and torch.isnan(model[0].weight.grad).any()

    model.zero_grad(set_to_none=True)
    model(good).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    gate = GradientGate(model.parameters(), torch.device("cpu"))
    for x in (good, bad):  # a finite micro-batch, then a NaN one, accumulated
        loss = model(x).sum()
        assert bool(gate.set(loss)) == (x is good)
        loss.backward()
    for p, ref in zip(model.parameters(), reference, strict=True):
        assert torch.equal(p.grad, ref)  # the NaN micro-batch added exact zeros
    gate.remove()
    model(bad).sum().backward()
    assert torch.isnan(model[0].weight.grad).any()  # hooks removed


def test_optimizer_update_skipped_leaves_weights_and_adam_state_alone():
    from types import SimpleNamespace

    from train.nonfinite import optimizer_update_skipped, torch_optimizers

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()

    def state() -> list[torch.Tensor]:
        return [t.clone() for p in model.parameters() for t in (p.detach(), *opt.state[p].values())]

    before = state()
    with optimizer_update_skipped(opt):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, state(), strict=True))
    opt.step()  # the real step is back
    assert not torch.equal(before[0], model.weight.detach())
    assert opt.state[model.weight]["step"] == 2
    # DeepSpeed wrappers keep the torch optimizer as .optimizer (ZeRO 3 offload also .backup_optimizer)
    assert torch_optimizers(SimpleNamespace(optimizer=opt, backup_optimizer=None)) == [opt]
    with pytest.raises(TypeError, match="cannot find the torch optimizer"):
        torch_optimizers(SimpleNamespace())


class _Reached(Exception):
    """Raised by the patched collective: the test has seen what it needed."""


class _FakeEngine(torch.nn.Module):
    """The engine methods the loop uses, on a small model."""

    def __init__(self, vocab: int, device: torch.device):
        super().__init__()
        self.module = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)).to(device)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.n_backward = self.n_step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.n_backward += 1
        loss.backward()

    def step(self) -> None:
        self.n_step += 1


class _FakeData:
    n_val_windows = 8

    def batch(self, step, micro, rank, world, micro_batch_size, grad_accum):
        return torch.randint(0, 16, (micro_batch_size, 9))

    def val_batches(self, rank, world, micro_batch_size, n):
        return [torch.randint(0, 16, (micro_batch_size, 9)) for _ in range(n)]


def test_collectives_get_tensors_on_the_rank_device(monkeypatch):
    """NCCL refuses host tensors: every all-reduce of the loop must get a tensor on the rank's
    device. The device here is 'meta' (not the CPU), so a host tensor would be caught. Meta tensors
    cannot be read on the host either, so reaching the step's all-reduce after both micro-batches
    also shows that no micro-batch synchronised (float(loss), .item()): the all-reduce comes once
    per step, after every backward and before the accumulation boundary's engine.step()."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from train.nonfinite import GradientGate
    from train.prefetch import BatchPrefetcher
    from train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # no process group: only what the loop reads
    trainer.cfg = load_run_config(TINY, ["train.grad_accum=2", "eval.batches=2"])
    trainer.plan = SimpleNamespace(data=_FakeData())
    trainer.rank, trainer.world, trainer.device = 0, 2, torch.device("meta")
    t = trainer.cfg.train
    trainer.batches = BatchPrefetcher(
        lambda k: _FakeData().batch(k // t.grad_accum, k % t.grad_accum, 0, 2, t.micro_batch_size, 0),
        trainer.device,
    )
    trainer.engine = _FakeEngine(16, trainer.device)
    trainer.stop = SimpleNamespace(signum=0)
    trainer.gate = GradientGate(trainer.engine.module.parameters(), trainer.device)
    trainer._fault_now = False
    seen: list[torch.device] = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor.device)
        counts.append((trainer.engine.n_backward, trainer.engine.n_step))
        raise _Reached

    counts: list[tuple[int, int]] = []
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(_Reached):
        trainer._train_step(0, 1e-3)
    assert counts == [(2, 1)]  # both backward passes done, the boundary step() not yet
    with pytest.raises(_Reached):
        trainer.validate()
    assert seen == [torch.device("meta")] * 2
