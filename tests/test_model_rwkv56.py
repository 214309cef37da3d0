"""RWKV-5 (x052) and RWKV-6 (x060) models: sizes and names, initialisation against RWKV-LM's formulas
transcribed loop by loop, RNN mode, state gradients, and logits and state against the `rwkv` package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from weights import perturb

from train.config import PRESETS, ModelConfig
from train.model import RWKV
from train.models import arch_of_state_dict, rwkv5, rwkv6

ARCHS = ("rwkv5", "rwkv6")
PRESETS56 = [name for name, p in PRESETS.items() if p.get("arch") in ARCHS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small shapes run fastest on one thread, and stay fast when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(arch: str, **overrides) -> ModelConfig:
    """Two heads of 64; the pure-PyTorch WKV-6 so the test does not depend on a compiled kernel."""
    values = {"arch": arch, "n_layer": 2, "n_embd": 128, "vocab_size": 300, "ctx_len": 64,
              "wkv_backend": "reference"}
    values.update(overrides)
    return ModelConfig(**values)


# ---------------------------------------------------------------------------------------- the rwkv package
# Its own process: the package reads RWKV_JIT_ON / RWKV_V7_ON at import time.
RWKV_PACKAGE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from rwkv.model import RWKV
    path, out = sys.argv[1], sys.argv[2]
    tokens = [int(t) for t in sys.argv[3].split(",")]
    model = RWKV(model=path, strategy="cpu fp32")
    with torch.no_grad():
        seq_logits, _ = model.forward(tokens, None, full_output=True)  # all tokens at once
        state = None
        for t in tokens:  # one token at a time
            one_logits, state = model.forward([t], state)
    torch.save({"seq": seq_logits, "one": one_logits, "state": state, "version": model.version}, out)
    """
)


@pytest.mark.parametrize(("arch", "version"), [("rwkv5", 5.2), ("rwkv6", 6.0)])
def test_logits_and_state_match_the_rwkv_package(arch, version, tmp_path):
    """Our state_dict saved as a .pth, unrenamed, loads in `rwkv.model.RWKV` (cpu fp32) as v5.2 / v6.0;
    its logits at every position and its final state (att_x, wkv, ffn_x per layer) match ours."""
    torch.manual_seed(1)
    model = perturb(RWKV(small_config(arch)), seed=1).eval()
    pth = tmp_path / f"{arch}.pth"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, pth)
    tokens = [5, 17, 250, 3, 99, 42, 7, 0, 299, 128, 64, 5]
    script = tmp_path / "rwkv_package.py"
    script.write_text(RWKV_PACKAGE_SCRIPT)
    out = tmp_path / "out.pt"
    env = {**os.environ, "RWKV_V7_ON": "0", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(pth.with_suffix("")), str(out), ",".join(map(str, tokens))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    theirs = torch.load(out)
    assert theirs["version"] == version
    with torch.no_grad():
        parallel = model(torch.tensor([tokens]))[0]
        last, state = model.forward_rnn(torch.tensor(tokens))
    assert parallel.abs().max() > 1.0  # the perturbed model is far from the near-zero fresh init
    torch.testing.assert_close(parallel, theirs["seq"].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, theirs["one"].float(), atol=1e-4, rtol=1e-4)
    for ours, their in zip(state.to_rwkv_package(), theirs["state"], strict=True):
        torch.testing.assert_close(ours, their.float().reshape(ours.shape), atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------- sizes, names
@pytest.mark.parametrize("preset", PRESETS56)
def test_preset_builds_on_meta_with_the_formula_parameter_count(preset):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = RWKV(cfg)
    assert isinstance(model, rwkv6.Model if cfg.arch == "rwkv6" else rwkv5.Model)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params()
    sd = model.state_dict()
    assert arch_of_state_dict(sd) == cfg.arch
    # The shape fields read back from the state dict's tensor shapes (what a converter loads by).
    module = rwkv6 if cfg.arch == "rwkv6" else rwkv5
    shapes = module.config_from_state_dict(sd)
    assert ModelConfig(**shapes, ctx_len=cfg.ctx_len) == cfg


def test_released_sizes():
    """Parameter counts of released World models, and RWKV-LM's widths: dim_ffn 3.5 C rounded down to
    a multiple of 32; x060 LoRA 32/64, 64/128 at C = 4096."""
    sizes = {"rwkv5-0.4b": 0.46, "rwkv5-1.5b": 1.58, "rwkv5-7b": 7.52, "rwkv6-1.6b": 1.60, "rwkv6-3b": 3.10,
             "rwkv6-7b": 7.64, "rwkv6-14b": 14.07}
    for preset, billions in sizes.items():
        assert round(ModelConfig.from_preset(preset).n_params() / 1e9, 2) == billions, preset
    assert ModelConfig.from_preset("rwkv5-3b").dim_ffn == 8960
    small, big = ModelConfig.from_preset("rwkv6-3b"), ModelConfig.from_preset("rwkv6-14b")
    assert (small.dim_mix_lora, small.dim_decay_lora) == (32, 64)
    assert (big.dim_mix_lora, big.dim_decay_lora) == (64, 128)


def test_a_released_style_checkpoint_is_told_apart_from_other_generations():
    """Key names alone pick the generation (no config beside a released .pth)."""
    names = {}
    for arch in ("rwkv4", "rwkv5", "rwkv6", "rwkv7"):
        with torch.device("meta"):
            names[arch] = RWKV(ModelConfig(arch=arch, n_layer=2, n_embd=128, vocab_size=300)).state_dict()
        assert arch_of_state_dict(names[arch]) == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_names_and_shapes_are_rwkv_lm(arch):
    cfg = small_config(arch)
    C, H, N, Fd, D, E = 128, 2, 64, 448, 32, 64
    with torch.device("meta"):
        sd = RWKV(cfg).state_dict()
    expected = {"emb.weight": (300, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(2):
        b = f"blocks.{i}."
        expected.update({b + f"{ln}.{wb}": (C,) for ln in ("ln1", "ln2") for wb in ("weight", "bias")})
        if arch == "rwkv5":
            expected.update({b + f"att.time_mix_{c}": (1, 1, C) for c in "kvrg"})
            expected.update({b + f"ffn.time_mix_{c}": (1, 1, C) for c in "kr"})
            expected[b + "att.time_decay"] = (H, N)
        else:
            expected.update({b + f"att.time_maa_{c}": (1, 1, C) for c in "xwkvrg"})
            expected.update({b + "att.time_maa_w1": (C, 5 * D), b + "att.time_maa_w2": (5, D, C)})
            expected.update({b + "att.time_decay": (1, 1, C), b + "att.time_decay_w1": (C, E)})
            expected.update({b + "att.time_decay_w2": (E, C)})
            expected.update({b + f"ffn.time_maa_{c}": (1, 1, C) for c in "kr"})
        expected[b + "att.time_faaaa"] = (H, N)
        projections = ("receptance", "key", "value", "output", "gate")
        expected.update({b + f"att.{m}.weight": (C, C) for m in projections})
        expected.update({b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,)})
        expected.update({b + "ffn.key.weight": (Fd, C), b + "ffn.receptance.weight": (C, C)})
        expected[b + "ffn.value.weight"] = (C, Fd)
    expected.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (300, C)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_rules_are_rwkv_lm_v5(arch):
    """configure_optimizers with layerwise_lr, my_pile_stage 1: time_decay 2x (not its LoRA factors),
    decay on 2-D `.weight` tensors only."""
    from train.optim import param_groups

    model = RWKV(small_config(arch))
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1, layerwise_lr=True)}
    names = {id(p): n for n, p in model.named_parameters()}
    in_group = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert in_group["lr_2x"] == ["blocks.0.att.time_decay", "blocks.1.att.time_decay"]
    assert "lr_3x" not in in_group
    decayed = set(in_group["decay"])
    assert {"emb.weight", "head.weight", "blocks.1.ffn.key.weight", "blocks.0.att.gate.weight"} <= decayed
    assert all(n.endswith(".weight") and "ln" not in n for n in decayed)
    assert "blocks.0.att.time_faaaa" in in_group["lr_1x"]
    if arch == "rwkv6":
        assert {"blocks.0.att.time_decay_w1", "blocks.0.att.time_maa_w2"} <= set(in_group["lr_1x"])
    assert rwkv5.lr_scale("blocks.0.att.time_decay", layerwise_lr=False) == 1.0


# ------------------------------------------------------------------------------------------ initialisation
def rwkv_lm_vectors(arch: str, layer_id: int, n_layer: int, C: int, N: int) -> dict[str, torch.Tensor]:
    """RWKV_Tmix_x052/x060 and RWKV_CMix_x052/x060.__init__'s vectors, transcribed loop by loop (float32
    as there)."""
    ratio_0_to_1 = layer_id / (n_layer - 1)
    ratio_1_to_almost0 = 1.0 - (layer_id / n_layer)
    ddd = torch.ones(1, 1, C)
    for i in range(C):
        ddd[0, 0, i] = i / C
    decay_speed, tmp = torch.ones(C), torch.zeros(C)
    for n in range(C):
        decay_speed[n] = -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * ratio_0_to_1)
        zigzag = ((n + 1) % 3 - 1) * 0.1
        tmp[n] = ratio_0_to_1 * (1 - (n / (C - 1))) + zigzag
    out = {"att.time_faaaa": tmp.reshape(C // N, N)}
    if arch == "rwkv5":
        return {
            **out,
            "att.time_mix_k": torch.pow(ddd, ratio_1_to_almost0),
            "att.time_mix_v": torch.pow(ddd, ratio_1_to_almost0) + 0.3 * ratio_0_to_1,
            "att.time_mix_r": torch.pow(ddd, 0.5 * ratio_1_to_almost0),
            "att.time_mix_g": torch.pow(ddd, 0.5 * ratio_1_to_almost0),
            "att.time_decay": decay_speed.reshape(C // N, N),
            "ffn.time_mix_k": torch.pow(ddd, ratio_1_to_almost0),
            "ffn.time_mix_r": torch.pow(ddd, ratio_1_to_almost0),
        }
    return {
        **out,
        "att.time_maa_x": 1.0 - torch.pow(ddd, ratio_1_to_almost0),
        "att.time_maa_w": 1.0 - torch.pow(ddd, ratio_1_to_almost0),
        "att.time_maa_k": 1.0 - torch.pow(ddd, ratio_1_to_almost0),
        "att.time_maa_v": 1.0 - (torch.pow(ddd, ratio_1_to_almost0) + 0.3 * ratio_0_to_1),
        "att.time_maa_r": 1.0 - torch.pow(ddd, 0.5 * ratio_1_to_almost0),
        "att.time_maa_g": 1.0 - torch.pow(ddd, 0.5 * ratio_1_to_almost0),
        "att.time_decay": decay_speed.reshape(1, 1, C),
        "ffn.time_maa_k": 1.0 - torch.pow(ddd, ratio_1_to_almost0**3),
        "ffn.time_maa_r": 1.0 - torch.pow(ddd, ratio_1_to_almost0**3),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_init_follows_rwkv_lm(arch):
    cfg = small_config(arch, n_layer=3)
    torch.manual_seed(0)
    sd = RWKV(cfg).state_dict()
    C, L = cfg.n_embd, cfg.n_layer
    eye = torch.eye
    for i in range(L):
        for name, value in rwkv_lm_vectors(arch, i, L, C, cfg.head_size).items():
            torch.testing.assert_close(sd[f"blocks.{i}.{name}"], value, atol=1e-6, rtol=1e-6, msg=name)
        b = f"blocks.{i}.att."
        if arch == "rwkv6":  # LoRA: zeros x uniform(-0.01, 0.01)
            assert torch.all(sd[b + "time_maa_w1"] == 0) and torch.all(sd[b + "time_decay_w1"] == 0)
            for w2 in (sd[b + "time_maa_w2"], sd[b + "time_decay_w2"]):
                assert w2.abs().max() <= 0.01 and w2.abs().max() > 0.009
                assert abs(w2.std().item() - 0.02 / 12**0.5) < 5e-4  # std of U(-a, a): a / sqrt(3)
        for proj, gain in (("receptance", 1.0), ("key", 0.1), ("value", 1.0), ("gate", 0.1)):
            w = sd[b + f"{proj}.weight"]
            torch.testing.assert_close(w @ w.T, gain**2 * eye(C), atol=1e-5, rtol=0)
        assert torch.all(sd[b + "output.weight"] == 0)
        torch.testing.assert_close(sd[b + "ln_x.weight"], torch.full((C,), ((1 + i) / L) ** 0.7))
        assert torch.all(sd[b + "ln_x.bias"] == 0)
        fk = sd[f"blocks.{i}.ffn.key.weight"]  # (F, C), F > C: orthonormal columns, gain 1
        torch.testing.assert_close(fk.T @ fk, eye(C), atol=1e-5, rtol=0)
        assert torch.all(sd[f"blocks.{i}.ffn.value.weight"] == 0)
        assert torch.all(sd[f"blocks.{i}.ffn.receptance.weight"] == 0)
        for ln in ("ln1", "ln2"):
            assert torch.all(sd[f"blocks.{i}.{ln}.weight"] == 1)
            assert torch.all(sd[f"blocks.{i}.{ln}.bias"] == 0)
    emb = sd["emb.weight"]
    assert emb.abs().max() <= 1e-4 and emb.abs().max() > 5e-5
    head = sd["head.weight"]  # (V, C), V > C: gain 0.5 sqrt(V / C)
    torch.testing.assert_close(head.T @ head, 0.25 * cfg.vocab_size / C * eye(C), atol=1e-4, rtol=0)
    torch.manual_seed(0)
    again = RWKV(cfg).state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)


# ----------------------------------------------------------------------------------------- RNN mode, state
@pytest.mark.parametrize("arch", ARCHS)
def test_rnn_mode_equals_parallel_mode_fp64(arch):
    """Token by token, in uneven chunks, and batched: the same logits as the parallel forward (fp64)."""
    torch.manual_seed(0)
    model = perturb(RWKV(small_config(arch)).double(), seed=3).eval()
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        parallel = model(idx)
        state, steps = None, []
        for t in range(24):
            logits, state = model.forward_rnn(idx[:, t : t + 1], state)
            steps.append(logits)
        torch.testing.assert_close(torch.stack(steps, dim=1), parallel, atol=1e-10, rtol=1e-10)
        state1 = None
        for a, b in ((0, 7), (7, 8), (8, 24)):  # unbatched, in chunks
            logits, state1 = model.forward_rnn(idx[1, a:b], state1)
            torch.testing.assert_close(logits, parallel[1, b - 1], atol=1e-10, rtol=1e-10)
    assert state.wkv.dtype == torch.float64 and state1.wkv.shape == (2, 2, 64, 64)
    for ours, batched in zip(state1, state, strict=True):
        torch.testing.assert_close(ours, batched[:, 1], atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="state has shapes"):
        model.forward_rnn(idx[:, :1], state1)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_with_state_is_differentiable_in_the_state(arch):
    """Two windows with the state carried (not detached) give the logits and parameter gradients of one
    window; the gradient wrt the carried state matches a central finite difference (fp64)."""
    torch.manual_seed(0)
    model = perturb(RWKV(small_config(arch)).double(), seed=4)
    idx = torch.randint(0, 300, (2, 12))
    whole, whole_state = model.forward_with_state(idx)
    torch.testing.assert_close(whole, model(idx), atol=1e-12, rtol=1e-12)
    whole.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    first, state = model.forward_with_state(idx[:, :5])
    second, last = model.forward_with_state(idx[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-10, rtol=1e-10)
    for a, b in zip(last, whole_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    (torch.cat([first, second], 1).square().mean()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-9, rtol=1e-7, msg=n)
    # d loss / d state against finite differences along a random direction
    state = rwkv5.State(*(t.detach().requires_grad_(True) for t in state))
    loss = model.forward_with_state(idx[:, 5:], state)[0].square().mean()
    g = torch.autograd.grad(loss, list(state))
    dirs = [torch.randn_like(t) for t in state]
    eps = 1e-6
    with torch.no_grad():
        def at(sign: float) -> float:
            shifted = rwkv5.State(*(t + sign * eps * d for t, d in zip(state, dirs, strict=True)))
            return model.forward_with_state(idx[:, 5:], shifted)[0].square().mean().item()
        numeric = (at(1.0) - at(-1.0)) / (2 * eps)
    analytic = sum((gi * d).sum().item() for gi, d in zip(g, dirs, strict=True))
    assert all(gi.abs().sum() > 0 for gi in g)
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_convert_refuses_hf_output_for_rwkv5_and_rwkv6(tmp_path):
    from launch import convert
    from launch.checkpoint_io import CheckpointError

    for arch in ARCHS:
        src = tmp_path / f"{arch}.pth"
        torch.save(RWKV(small_config(arch)).state_dict(), src)
        with pytest.raises(CheckpointError, match="no Hugging Face format"):
            convert.convert(src, "hf", tmp_path / f"{arch}-hf")
        assert not (tmp_path / f"{arch}-hf" / "model.safetensors").exists()
