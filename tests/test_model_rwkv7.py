"""RWKV-7 (x070) model: sizes and names, initialisation, RNN mode, and logits against independent
implementations (the `rwkv` inference package with RWKV_V7_ON=1, and the `rwkv7_hf` HF reference)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from weights import perturb

from train.config import PRESETS, ModelConfig
from train.model import RWKV
from train.models import rwkv7
from train.models.rwkv7 import State, config_from_state_dict

ROOT = Path(__file__).resolve().parents[1]
RWKV7_PRESETS = [name for name, p in PRESETS.items() if p.get("arch") == "rwkv7"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small shapes run fastest on one thread, and stay fast when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**overrides) -> ModelConfig:
    """Two heads of 64, LoRA widths 32 (the smallest the released checkpoints use)."""
    values = {"arch": "rwkv7", "n_layer": 3, "n_embd": 128, "vocab_size": 300, "ctx_len": 64}
    values.update(overrides)
    return ModelConfig(**values)


# ---------------------------------------------------------------------------------------- the rwkv package
# Runs in its own process: the package picks its RWKV-7 code path at import time from RWKV_V7_ON.
RWKV_PACKAGE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from rwkv.model import RWKV
    path, out = sys.argv[1], sys.argv[2]
    tokens = [int(t) for t in sys.argv[3].split(",")]
    model = RWKV(model=path, strategy="cpu fp32")
    with torch.no_grad():
        seq_logits, seq_state = model.forward(tokens, None, full_output=True)  # all tokens at once
        state = None
        for t in tokens:  # one token at a time
            one_logits, state = model.forward([t], state)
    torch.save({"seq": seq_logits, "one": one_logits, "state": state}, out)
    """
)


def run_rwkv_package(pth: Path, tokens: list[int], tmp_path: Path) -> dict:
    script = tmp_path / "rwkv_package_x070.py"
    script.write_text(RWKV_PACKAGE_SCRIPT)
    out = tmp_path / "rwkv_package_out.pt"
    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1", "OMP_NUM_THREADS": "1"}
    # The package loads "<model>.pth": it is given the path without the suffix.
    proc = subprocess.run(
        [sys.executable, str(script), str(pth.with_suffix("")), str(out), ",".join(map(str, tokens))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out)


def test_logits_and_state_match_the_rwkv_package(tmp_path):
    """Our state_dict saved as a .pth, unrenamed, loads in `rwkv.model.RWKV` (x070, cpu fp32); its logits
    for every position and its final state (att_x, wkv, ffn_x per layer) match ours in both modes."""
    torch.manual_seed(1)
    model = perturb(RWKV(small_config()), seed=1).eval()
    pth = tmp_path / "rwkv7-small.pth"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, pth)
    tokens = [5, 17, 250, 3, 99, 42, 7, 0, 299, 128, 64, 5]
    theirs = run_rwkv_package(pth, tokens, tmp_path)
    idx = torch.tensor([tokens])
    with torch.no_grad():
        parallel = model(idx)[0]
        last, state = model.forward_rnn(torch.tensor(tokens))
    assert parallel.abs().max() > 1.0  # the perturbed model is far from the near-zero fresh init
    torch.testing.assert_close(parallel, theirs["seq"].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, theirs["one"].float(), atol=1e-4, rtol=1e-4)
    for ours, their in zip(state.to_rwkv_package(), theirs["state"], strict=True):
        torch.testing.assert_close(ours, their.float(), atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------- sizes, names
@pytest.mark.parametrize("preset", RWKV7_PRESETS)
def test_preset_builds_on_meta_with_the_formula_parameter_count(preset):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = RWKV(cfg)
    assert isinstance(model, rwkv7.Model)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params() == rwkv7.n_params(cfg)
    # The shape fields read back from the state dict's tensor shapes (what a converter loads by).
    shapes = config_from_state_dict(model.state_dict())
    assert shapes == {k: getattr(cfg, k) for k in shapes}
    assert ModelConfig(**shapes, ctx_len=cfg.ctx_len) == cfg


def test_released_0_1b_sizes():
    """rwkv7-g1 0.1b (L12 D768): LoRA widths 64/64/32/128 and 191M parameters, as released."""
    cfg = ModelConfig.from_preset("rwkv7-0.1b")
    assert (cfg.dim_w_lora, cfg.dim_a_lora, cfg.dim_v_lora, cfg.dim_g_lora) == (64, 64, 32, 128)
    assert round(cfg.n_params() / 1e6) == 191


def test_state_dict_names_and_shapes_are_rwkv_lm_x070():
    cfg = small_config(n_layer=2, vocab_size=300)
    C, H, N, Fd = 128, 2, 64, 512
    Dw, Da, Dv, Dg = cfg.dim_w_lora, cfg.dim_a_lora, cfg.dim_v_lora, cfg.dim_g_lora
    with torch.device("meta"):
        sd = RWKV(cfg).state_dict()
    expected = {"emb.weight": (300, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(2):
        b = f"blocks.{i}."
        expected.update({b + f"{ln}.{wb}": (C,) for ln in ("ln1", "ln2") for wb in ("weight", "bias")})
        expected.update({b + f"att.x_{c}": (1, 1, C) for c in "rwkvag"})
        for lora, d in zip("wavg", (Dw, Da, Dv, Dg), strict=True):
            expected[b + f"att.{lora}1"] = (C, d)
            expected[b + f"att.{lora}2"] = (d, C)
            if lora != "g":
                expected[b + f"att.{lora}0"] = (1, 1, C)
        expected.update({b + "att.k_k": (1, 1, C), b + "att.k_a": (1, 1, C), b + "att.r_k": (H, N)})
        expected.update({b + f"att.{m}.weight": (C, C) for m in ("receptance", "key", "value", "output")})
        expected.update({b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,)})
        expected.update({b + "ffn.x_k": (1, 1, C), b + "ffn.key.weight": (Fd, C)})
        expected[b + "ffn.value.weight"] = (C, Fd)
    expected.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (300, C)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_optimizer_rules_are_rwkv_lm_v7():
    from train.optim import param_groups

    model = RWKV(small_config(n_layer=2))
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1, layerwise_lr=True)}
    names = {id(p): n for n, p in model.named_parameters()}
    in_group = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert in_group["lr_2x"] == ["blocks.0.att.w0", "blocks.1.att.w0"]
    decayed = set(in_group["decay"])
    assert "emb.weight" in decayed and "head.weight" in decayed and "blocks.1.ffn.key.weight" in decayed
    assert not any(n.split(".")[-1] in ("w1", "w2", "a1", "g2", "r_k") for n in decayed)
    assert all(n.endswith(".weight") for n in decayed)
    assert rwkv7.lr_scale("blocks.0.att.w0", layerwise_lr=False) == 1.0


# ------------------------------------------------------------------------------------------ initialisation
def rwkv_lm_vectors(layer_id: int, n_layer: int, C: int, N: int) -> dict[str, torch.Tensor]:
    """RWKV_Tmix_x070 / RWKV_CMix_x070.__init__'s vectors, transcribed loop by loop (float32 as there)."""
    ratio_0_to_1 = layer_id / (n_layer - 1)
    ratio_1_to_almost0 = 1.0 - (layer_id / n_layer)
    ddd = torch.ones(1, 1, C)
    for i in range(C):
        ddd[0, 0, i] = i / C
    www, zigzag, linear = torch.zeros(C), torch.zeros(C), torch.zeros(C)
    for n in range(C):
        linear[n] = n / (C - 1) - 0.5
        zigzag[n] = ((n % N) - ((N - 1) / 2)) / ((N - 1) / 2)
        zigzag[n] = zigzag[n] * abs(zigzag[n])
        www[n] = -6 + 6 * (n / (C - 1)) ** (1 + 1 * ratio_0_to_1**0.3)
    return {
        "att.x_r": 1.0 - torch.pow(ddd, 0.2 * ratio_1_to_almost0),
        "att.x_w": 1.0 - torch.pow(ddd, 0.9 * ratio_1_to_almost0),
        "att.x_k": 1.0 - torch.pow(ddd, 0.7 * ratio_1_to_almost0),
        "att.x_v": 1.0 - torch.pow(ddd, 0.7 * ratio_1_to_almost0),
        "att.x_a": 1.0 - torch.pow(ddd, 0.9 * ratio_1_to_almost0),
        "att.x_g": 1.0 - torch.pow(ddd, 0.2 * ratio_1_to_almost0),
        "att.w0": www.reshape(1, 1, C) + 0.5 + zigzag * 2.5,
        "att.a0": torch.zeros(1, 1, C) - 0.19 + zigzag * 0.3 + linear * 0.4,
        "att.v0": torch.zeros(1, 1, C) + 0.73 - linear * 0.4,
        "att.k_k": torch.zeros(1, 1, C) + 0.71 - linear * 0.1,
        "att.k_a": torch.zeros(1, 1, C) + 1.02,
        "att.r_k": torch.zeros(C // N, N) - 0.04,
        "ffn.x_k": 1.0 - torch.pow(ddd, ratio_1_to_almost0**4),
    }


def test_init_follows_rwkv_lm_v7():
    cfg = small_config(n_layer=3, vocab_size=300)
    torch.manual_seed(0)
    model = RWKV(cfg)
    sd = model.state_dict()
    C, L = cfg.n_embd, cfg.n_layer
    eye = torch.eye
    for i in range(L):
        for name, value in rwkv_lm_vectors(i, L, C, cfg.head_size).items():
            torch.testing.assert_close(sd[f"blocks.{i}.{name}"], value, atol=1e-6, rtol=1e-6, msg=name)
        b = f"blocks.{i}.att."
        for lora in "wavg":
            assert torch.all(sd[b + f"{lora}1"] == 0)
            w2 = sd[b + f"{lora}2"]  # (D, C), D < C: orthonormal rows scaled by 0.1
            torch.testing.assert_close(w2 @ w2.T, 0.01 * eye(w2.shape[0]), atol=1e-5, rtol=0)
        for proj, gain in (("receptance", 1.0), ("key", 0.1), ("value", 1.0)):
            w = sd[b + f"{proj}.weight"]
            torch.testing.assert_close(w @ w.T, gain**2 * eye(C), atol=1e-5, rtol=0)
        assert torch.all(sd[b + "output.weight"] == 0)
        torch.testing.assert_close(sd[b + "ln_x.weight"], torch.full((C,), ((1 + i) / L) ** 0.7))
        assert torch.all(sd[b + "ln_x.bias"] == 0)
        fk = sd[f"blocks.{i}.ffn.key.weight"]  # (4C, C): orthonormal columns, gain 1
        torch.testing.assert_close(fk.T @ fk, eye(C), atol=1e-5, rtol=0)
        assert torch.all(sd[f"blocks.{i}.ffn.value.weight"] == 0)
        for ln in ("ln1", "ln2"):
            assert torch.all(sd[f"blocks.{i}.{ln}.weight"] == 1)
            assert torch.all(sd[f"blocks.{i}.{ln}.bias"] == 0)
    emb = sd["emb.weight"]
    assert emb.abs().max() <= 1e-4 and emb.abs().max() > 5e-5
    head = sd["head.weight"]  # (V, C), V > C: gain 0.5 sqrt(V / C)
    torch.testing.assert_close(head.T @ head, 0.25 * cfg.vocab_size / C * eye(C), atol=1e-4, rtol=0)
    # torch.manual_seed decides the weights; each parameter has its own generator.
    torch.manual_seed(0)
    again = RWKV(cfg).state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert not torch.equal(sd["blocks.0.att.w2"], sd["blocks.1.att.w2"])


def test_init_on_meta_then_materialised_equals_direct_init():
    """The path ZeRO-3 and big models take: build without storage, allocate, then init_weights."""
    cfg = small_config(n_layer=2)
    torch.manual_seed(5)
    direct = RWKV(cfg)
    torch.manual_seed(5)
    with torch.device("meta"):
        late = RWKV(cfg)
    late = late.to_empty(device="cpu")
    late.init_weights()
    for k, v in direct.state_dict().items():
        assert torch.equal(v, late.state_dict()[k]), k


# ----------------------------------------------------------------------------------------- RNN mode, state
def test_rnn_mode_equals_parallel_mode_fp64():
    """Token by token, in uneven chunks, and batched: the same logits as the parallel forward (fp64)."""
    torch.manual_seed(0)
    model = perturb(RWKV(small_config(n_layer=2)).double(), seed=3).eval()
    idx = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        parallel = model(idx)
        state, steps = None, []
        for t in range(50):
            logits, state = model.forward_rnn(idx[:, t : t + 1], state)
            steps.append(logits)
        torch.testing.assert_close(torch.stack(steps, dim=1), parallel, atol=1e-10, rtol=1e-10)
        state1 = None
        for a, b in ((0, 7), (7, 8), (8, 31), (31, 50)):  # unbatched, in chunks
            logits, state1 = model.forward_rnn(idx[1, a:b], state1)
            torch.testing.assert_close(logits, parallel[1, b - 1], atol=1e-10, rtol=1e-10)
    assert state.wkv.dtype == torch.float64 and state1.wkv.shape == (2, 2, 64, 64)
    for ours, batched in zip(state1, state, strict=True):
        torch.testing.assert_close(ours, batched[:, 1], atol=1e-10, rtol=1e-10)


def test_forward_with_state_across_windows_equals_one_window():
    torch.manual_seed(0)
    model = perturb(RWKV(small_config(n_layer=2)).double(), seed=4)
    idx = torch.randint(0, 300, (2, 20))
    whole, whole_state = model.forward_with_state(idx)
    first, state = model.forward_with_state(idx[:, :9])
    second, state = model.forward_with_state(idx[:, 9:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(whole, model(idx), atol=1e-12, rtol=1e-12)
    for a, b in zip(state, whole_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # the state carries gradients into the previous window
    second.sum().backward()
    assert model.blocks[0].att.receptance.weight.grad.abs().sum() > 0


def test_forward_rnn_leaves_the_given_state_untouched_and_checks_its_shape():
    model = perturb(RWKV(small_config(n_layer=2))).eval()
    with torch.no_grad():
        _, state = model.forward_rnn(torch.tensor([1, 2, 3]))
        before = State(*(t.clone() for t in state))
        model.forward_rnn(torch.tensor([4]), state)
        assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))
        with pytest.raises(ValueError, match="state has shapes"):
            model.forward_rnn(torch.tensor([[4], [5]]), state)
        with pytest.raises(ValueError, match="tokens of shape"):
            model.forward_rnn(torch.zeros(0, dtype=torch.long))
    fresh = model.init_state(3)
    assert fresh.att_x.shape == (2, 3, 128) and fresh.wkv.shape == (2, 3, 2, 64, 64)
    assert fresh.wkv.dtype == torch.float32
    assert State.from_rwkv_package(model.init_state().to_rwkv_package()).wkv.shape == (2, 2, 64, 64)


# ------------------------------------------------------------------------------------------------ training
def test_gradients_reach_every_parameter_that_the_math_uses():
    """Nonzero gradient everywhere but layer 0's v0/v1/v2, which exist (as in RWKV-LM) but are unused."""
    torch.manual_seed(0)
    model = perturb(RWKV(small_config(n_layer=2)).double(), seed=5)
    idx = torch.randint(0, 300, (2, 8))
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    for name, p in model.named_parameters():
        if name in unused:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_equal_gradients():
    torch.manual_seed(3)
    cfg = small_config(n_layer=2)
    plain = perturb(RWKV(cfg).double(), seed=6)
    ckpt = perturb(RWKV(ModelConfig(**{**cfg.to_dict(), "grad_cp": True})).double(), seed=6)
    idx = torch.randint(0, 300, (2, 8))
    for m in (plain, ckpt):
        m(idx).square().mean().backward()
        _, state = m.forward_with_state(idx)
        state.wkv.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-12, rtol=1e-10, msg=name)


# ------------------------------------------------------------------------------------------ HF (rwkv7_hf)
def hf_model_from_ours(model: RWKV):
    """An `rwkv7_hf` RWKV7ForCausalLM holding our weights, through launch/hf_format_rwkv7 (strict load)."""
    from rwkv7_hf.configuration_rwkv7 import RWKV7Config
    from rwkv7_hf.modeling_rwkv7 import RWKV7ForCausalLM

    from launch.hf_format_rwkv7 import hf_config, to_hf_state_dict

    sd = model.state_dict()
    config = hf_config(model.cfg.to_dict(), {k: tuple(v.shape) for k, v in sd.items()})
    hf = RWKV7ForCausalLM(RWKV7Config(**config)).to(next(model.parameters()).dtype).eval()
    hf.load_state_dict(to_hf_state_dict(sd), strict=True)
    return hf


def test_logits_match_the_rwkv7_hf_reference():
    torch.manual_seed(2)
    model = perturb(RWKV(small_config()), seed=2).eval()
    hf = hf_model_from_ours(model)
    idx = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(input_ids=idx).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_hf_mapping_agrees_with_rwkv7_hf_converter_and_round_trips():
    """Second cross-check: the package's own converter (RWKV-LM .pth -> HF) translates our names and
    shapes to the same tensors; and HF -> ours gives our state dict back (layer 0's unused v* as 0)."""
    from rwkv7_hf.converter import prepare_translated_weight, translate_name

    from launch.hf_format_rwkv7 import UNUSED, from_hf_state_dict, to_hf_state_dict

    model = perturb(RWKV(small_config()), seed=7)
    sd = model.state_dict()
    ours = to_hf_state_dict(sd)
    template = hf_model_from_ours(model).state_dict()
    theirs = {}
    for name, t in sd.items():
        key, transposed = translate_name(name, model.cfg.n_layer)
        if key:
            theirs[key] = prepare_translated_weight(
                t, src_name=name, dst_name=key, transposed=transposed, expected=template[key], dtype=t.dtype
            )
    assert ours.keys() == theirs.keys() == template.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    back = from_hf_state_dict(ours)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        expected = torch.zeros_like(v) if k in UNUSED else v
        assert torch.equal(back[k], expected), k


def test_flops_per_token_counts_the_matmuls_of_a_training_step(monkeypatch):
    """torch's FlopCounterMode counts every matmul FLOP of a forward + backward; with the WKV op replaced
    by an elementwise stand-in (the reference loop's einsums would count too) it equals 6 x matmul_params
    per token: the projections, the LoRA factors but layer 0's unused v1/v2, and the head."""
    from torch.utils.flop_counter import FlopCounterMode

    def elementwise_wkv(r, w, k, v, a, b, state=None, backend="auto"):
        return r * w * k * v * a * b, state

    monkeypatch.setattr(rwkv7, "wkv7", elementwise_wkv)
    cfg = small_config(n_layer=2)
    model = perturb(RWKV(cfg))
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    counter = FlopCounterMode(display=False)
    with counter:
        model(idx).sum().backward()
    assert counter.get_total_flops() == 6 * cfg.matmul_params() * idx.numel()
    wkv_term = cfg.flops_per_token() - 6 * cfg.matmul_params()
    assert wkv_term == 27 * 64 * cfg.n_embd * cfg.n_layer


def test_bf16_model_tracks_fp32_in_both_modes():
    torch.manual_seed(0)
    model = perturb(RWKV(small_config(n_layer=2)), seed=8).eval()
    idx = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ref = model(idx)
        half = model.to(torch.bfloat16)
        parallel = half(idx).float()
        last, state = half.forward_rnn(idx[0, :10])
        last, state = half.forward_rnn(idx[0, 10:], state)
    assert state.wkv.dtype == torch.float32 and state.att_x.dtype == torch.float32
    scale = ref.abs().max()
    assert (parallel - ref).abs().max() < 0.05 * scale
    assert (last.float() - ref[0, -1]).abs().max() < 0.05 * scale


def test_a_released_style_checkpoint_loads_by_its_shapes():
    """A bf16 state dict in RWKV-LM names (as the released .pth files are) loads strictly into the model
    that config_from_state_dict describes, with non-default LoRA widths."""
    src = RWKV(small_config(n_layer=2, dim_w_lora=64, dim_a_lora=32, dim_v_lora=32, dim_g_lora=96))
    sd = {k: v.to(torch.bfloat16) for k, v in perturb(src, seed=9).state_dict().items()}
    cfg = ModelConfig(**config_from_state_dict(sd))
    assert (cfg.dim_w_lora, cfg.dim_a_lora, cfg.dim_v_lora, cfg.dim_g_lora) == (64, 32, 32, 96)
    model = RWKV(cfg)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.blocks[1].att.g2.to(torch.bfloat16), sd["blocks.1.att.g2"])


def test_hf_directory_loads_with_from_pretrained(tmp_path):
    from rwkv7_hf.modeling_rwkv7 import RWKV7ForCausalLM

    from launch.hf_format_rwkv7 import save_hf_dir

    model = perturb(RWKV(small_config(n_layer=2)), seed=10).eval()
    save_hf_dir(model.state_dict(), model.cfg.to_dict(), tmp_path / "hf")
    hf = RWKV7ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, model(idx), atol=1e-4, rtol=1e-4)
