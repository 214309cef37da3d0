"""RWKV-4 model: sizes, initialisation, and the forward pass against independent implementations
(`transformers.RwkvForCausalLM`, the `rwkv` inference package), RNN mode, gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from weights import perturb

from train.config import PRESETS, ModelConfig
from train.model import RWKV


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small shapes run fastest on one thread, and stay fast when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**overrides) -> ModelConfig:
    values = {"n_layer": 3, "n_embd": 64, "vocab_size": 300, "ctx_len": 64}
    values.update(overrides)
    return ModelConfig(**values)


def hf_config(cfg: ModelConfig):
    from transformers import RwkvConfig

    # rescale_every=0: transformers otherwise halves att.output/ffn.value every 6 layers at inference.
    return RwkvConfig(
        vocab_size=cfg.vocab_size,
        context_length=cfg.ctx_len,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        attention_hidden_size=cfg.dim_att,
        intermediate_size=cfg.dim_ffn,
        layer_norm_epsilon=cfg.layer_norm_eps,
        rescale_every=0,
        tie_word_embeddings=False,
    )


def to_hf_key(key: str) -> str:
    """RWKV-LM key -> transformers RwkvForCausalLM key (written from transformers' own naming)."""
    if key == "head.weight":
        return key
    key = key.replace("emb.weight", "embeddings.weight").replace(".ln0.", ".pre_ln.")
    key = key.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
    for short, long in (("_k", "_key"), ("_v", "_value"), ("_r", "_receptance")):
        key = key.replace(f"time_mix{short}", f"time_mix{long}")
    return "rwkv." + key


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("preset", [name for name, p in PRESETS.items() if p.get("arch", "rwkv4") == "rwkv4"])
def test_preset_builds_on_meta_with_the_formula_parameter_count(preset):
    from transformers import RwkvForCausalLM

    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = RWKV(cfg)
        hf = RwkvForCausalLM(hf_config(cfg))
    assert all(p.is_meta for p in model.parameters())
    V, D, L = cfg.vocab_size, cfg.n_embd, cfg.n_layer
    count = sum(p.numel() for p in model.parameters())
    assert count == 2 * V * D + 13 * D * D * L + D * (11 * L + 4) == cfg.n_params()
    # transformers' independent RWKV-4 definition has the same tensors under other names.
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    ours = {to_hf_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == hf_shapes
    assert sum(p.numel() for p in hf.parameters()) == count


def test_state_dict_keys_are_rwkv_lm_names():
    model = RWKV(small_config(n_layer=2))
    expected = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"]
    for i in range(2):
        expected += [
            f"blocks.{i}.ln1.weight",
            f"blocks.{i}.ln1.bias",
            f"blocks.{i}.ln2.weight",
            f"blocks.{i}.ln2.bias",
        ]
        expected += [
            f"blocks.{i}.att.{n}"
            for n in ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r")
            + ("key.weight", "value.weight", "receptance.weight", "output.weight")
        ]
        expected += [
            f"blocks.{i}.ffn.{n}"
            for n in ("time_mix_k", "time_mix_r", "key.weight", "receptance.weight", "value.weight")
        ]
    expected += ["ln_out.weight", "ln_out.bias", "head.weight"]
    sd = model.state_dict()
    assert sorted(sd) == sorted(expected)
    C = 64
    assert sd["blocks.1.att.time_decay"].shape == (C,) and sd["blocks.1.att.time_first"].shape == (C,)
    assert sd["blocks.1.att.time_mix_k"].shape == (1, 1, C) and sd["blocks.1.ffn.time_mix_r"].shape == (
        1,
        1,
        C,
    )


# ---------------------------------------------------------------------------------------------- init
def test_init_follows_rwkv_lm_v4neo():
    """Loop-by-loop transcription of RWKV-LM v4neo's RWKV_TimeMix/RWKV_ChannelMix fancy init and the
    per-matrix rules of generate_init_weight, checked against the vectorised init in the model."""
    torch.manual_seed(0)
    cfg = small_config(n_layer=4, n_embd=48, vocab_size=500)
    model = RWKV(cfg)
    L, C = cfg.n_layer, cfg.n_embd
    for layer_id, block in enumerate(model.blocks):
        ratio_0_to_1 = layer_id / (L - 1)
        ratio_1_to_almost0 = 1.0 - (layer_id / L)
        ddd = torch.ones(1, 1, C)
        for i in range(C):
            ddd[0, 0, i] = i / C
        decay_speed = torch.ones(C)
        for h in range(C):
            decay_speed[h] = -5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * ratio_0_to_1)
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(C)]) * 0.5
        a, f = block.att, block.ffn
        torch.testing.assert_close(a.time_decay.data, decay_speed)
        torch.testing.assert_close(a.time_first.data, torch.ones(C) * math.log(0.3) + zigzag)
        torch.testing.assert_close(a.time_mix_k.data, torch.pow(ddd, ratio_1_to_almost0))
        torch.testing.assert_close(a.time_mix_v.data, torch.pow(ddd, ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
        torch.testing.assert_close(a.time_mix_r.data, torch.pow(ddd, 0.5 * ratio_1_to_almost0))
        torch.testing.assert_close(f.time_mix_k.data, torch.pow(ddd, ratio_1_to_almost0))
        torch.testing.assert_close(f.time_mix_r.data, torch.pow(ddd, ratio_1_to_almost0))
        for m in (a.key, a.receptance, a.output, f.value, f.receptance):
            assert torch.count_nonzero(m.weight) == 0
        # orthogonal with gain sqrt(rows/cols) when rows > cols: W^T W = gain^2 I
        eye = torch.eye(C)
        torch.testing.assert_close(a.value.weight.T @ a.value.weight, eye, atol=1e-4, rtol=0)
        torch.testing.assert_close(f.key.weight.T @ f.key.weight, 4.0 * eye, atol=1e-4, rtol=0)
        for ln in [block.ln1, block.ln2] + ([block.ln0] if layer_id == 0 else []):
            assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    emb = model.emb.weight
    assert emb.abs().max() <= 1e-4 and emb.std() > 0.4e-4
    head_gain = 0.5 * math.sqrt(cfg.vocab_size / C)
    torch.testing.assert_close(
        model.head.weight.T @ model.head.weight, head_gain**2 * torch.eye(C), atol=1e-3, rtol=0
    )


# ---------------------------------------------------------------------------------------------- forward
def test_logits_equal_transformers_rwkv():
    from transformers import RwkvForCausalLM

    torch.manual_seed(0)
    cfg = small_config()
    model = perturb(RWKV(cfg)).eval()
    hf = RwkvForCausalLM(hf_config(cfg)).eval()
    missing, unexpected = hf.load_state_dict(
        {to_hf_key(k): v for k, v in model.state_dict().items()}, strict=True
    )
    assert not missing and not unexpected
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(idx, use_cache=False).logits
    assert ours.shape == (2, 40, cfg.vocab_size)
    assert ours.std() > 0.5  # random weights give non-trivial logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_rnn_mode_equals_parallel_mode():
    torch.manual_seed(1)
    cfg = small_config()
    model = perturb(RWKV(cfg), seed=1).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 24))
    with torch.no_grad():
        full = model(idx)
        # a prompt in one call, then one token at a time, batched
        logits, state = model.forward_rnn(idx[:, :7])
        steps = [logits]
        for t in range(7, 24):
            logits, state = model.forward_rnn(idx[:, t : t + 1], state)
            steps.append(logits)
        # unbatched, whole sequence in one call
        single, single_state = model.forward_rnn(idx[1])
    assert (torch.stack(steps, 1) - full[:, 6:]).abs().max() <= 1e-5
    assert (single - full[1, -1]).abs().max() <= 1e-5
    assert single.shape == (cfg.vocab_size,) and single_state.shape == (cfg.n_layer, 5, cfg.n_embd)
    torch.testing.assert_close(single_state, state[:, :, 1], atol=1e-5, rtol=1e-5)


def test_forward_rnn_leaves_the_given_state_untouched_and_checks_its_shape():
    model = perturb(RWKV(small_config(n_layer=2))).eval()
    with torch.no_grad():
        _, state = model.forward_rnn(torch.tensor([1, 2, 3]))
        before = state.clone()
        model.forward_rnn(torch.tensor([4]), state)
        assert torch.equal(state, before)
        with pytest.raises(ValueError, match="state has shape"):
            model.forward_rnn(torch.tensor([[4], [5]]), state)


def test_rnn_mode_matches_the_rwkv_package(tmp_path, monkeypatch):
    """The `rwkv` pip package loads our state_dict saved as an RWKV-LM .pth; its logits and its
    5-slot state (att_xx, aa, bb, pp, ffn_xx per layer) match ours."""
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as RwkvPackageModel

    torch.manual_seed(2)
    model = perturb(RWKV(small_config()), seed=2).eval()
    path = tmp_path / "model.pth"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)
    ref = RwkvPackageModel(model=str(path), strategy="cpu fp32", verbose=False)
    tokens = [5, 17, 250, 3, 99, 42, 7]
    with torch.no_grad():
        theirs, their_state = ref.forward(tokens, None)
        ours, our_state = model.forward_rnn(torch.tensor(tokens))
    torch.testing.assert_close(ours, theirs.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(
        our_state.reshape(-1, model.cfg.n_embd), torch.stack(their_state), atol=2e-5, rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------- training
def test_gradient_checkpointing_gives_equal_gradients():
    torch.manual_seed(3)
    cfg = small_config()
    plain = perturb(RWKV(cfg), seed=3)
    ckpt = RWKV(ModelConfig.from_dict({**cfg.to_dict(), "grad_cp": True}))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    for m in (plain, ckpt):
        logits = m(idx)
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, cfg.vocab_size), idx[:, 1:].reshape(-1)
        ).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_gradients_equal_transformers_rwkv():
    """Backward through our model (WKV op included) equals autograd through transformers' model."""
    from transformers import RwkvForCausalLM

    torch.manual_seed(4)
    cfg = small_config(n_layer=2)
    model = perturb(RWKV(cfg), seed=4)
    hf = RwkvForCausalLM(hf_config(cfg))
    hf.load_state_dict({to_hf_key(k): v for k, v in model.state_dict().items()})
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    model(idx).square().mean().backward()
    hf(idx, use_cache=False).logits.square().mean().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[to_hf_key(name)].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_tiny_model_learns_real_text(demo_shards):
    """A few dozen AdamW steps on the tokenized demo corpus: held-out loss falls from ~ln(V) to below
    the unigram entropy of the training tokens (so the model uses context, not just frequencies)."""
    import numpy as np

    from data_prep.binidx import MMapIndexedDataset
    from data_prep.manifest import load_manifest

    manifest = load_manifest(demo_shards)
    vocab = manifest["tokenizer"]["vocab_size"]
    shard = MMapIndexedDataset(manifest["shards"][0]["prefix"])
    tokens = torch.from_numpy(np.array(shard.tokens[:120_000], dtype=np.int64))
    train_tokens, heldout = tokens[:100_000], tokens[100_000:]
    counts = torch.bincount(train_tokens, minlength=vocab).double() + 0.5
    probs = counts / counts.sum()
    unigram_entropy = float(-(probs * probs.log()).sum())

    torch.manual_seed(0)
    T, B = 64, 8
    cfg = ModelConfig.from_preset("tiny", vocab_size=vocab, n_layer=2, ctx_len=T)
    model = RWKV(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    eval_idx = heldout[: (len(heldout) // (T + 1)) * (T + 1)].view(-1, T + 1)[:16]

    def heldout_loss() -> float:
        with torch.no_grad():
            logits = model(eval_idx[:, :-1])
            return float(
                torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), eval_idx[:, 1:].reshape(-1))
            )

    before = heldout_loss()
    for _ in range(60):
        starts = torch.randint(0, len(train_tokens) - T - 1, (B,))
        batch = torch.stack([train_tokens[s : s + T + 1] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = heldout_loss()
    print(f"held-out loss {before:.3f} -> {after:.3f}; unigram entropy {unigram_entropy:.3f}")
    assert abs(before - math.log(vocab)) < 0.5
    assert after < unigram_entropy


def test_bf16_model_tracks_fp32_in_both_modes():
    """bf16 weights (as DeepSpeed's bf16 mode holds them): parallel and RNN logits stay close to fp32."""
    torch.manual_seed(5)
    cfg = small_config()
    model = perturb(RWKV(cfg), seed=5).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model(idx)
        model.to(torch.bfloat16)
        par = model(idx).float()
        rnn, state = model.forward_rnn(idx)
    assert state.dtype == torch.float32
    scale = ref.abs().max()
    assert (par - ref).abs().max() < 0.05 * scale
    assert (rnn.float() - ref[:, -1]).abs().max() < 0.05 * scale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the WKV CUDA kernel)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_matches_cpu_reference(dtype):
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:  # the kernel is compiled on first use
        pytest.skip("no CUDA toolkit (nvcc) to build the WKV kernel")
    torch.manual_seed(6)
    cfg = small_config(ctx_len=128)
    model = perturb(RWKV(cfg), seed=6)
    idx = torch.randint(0, cfg.vocab_size, (2, 100))
    ref = RWKV(ModelConfig.from_dict({**cfg.to_dict(), "wkv_backend": "reference"}))
    ref.load_state_dict(model.state_dict())
    expected = ref(idx)
    expected.square().mean().backward()
    gpu = RWKV(ModelConfig.from_dict({**cfg.to_dict(), "wkv_backend": "cuda"}))
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.to("cuda", dtype)
    got = gpu(idx.cuda())
    got.float().square().mean().backward()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    scale = expected.abs().max()
    assert (got.float().cpu() - expected).abs().max() <= tol * scale
    for (name, a), (_, b) in zip(ref.named_parameters(), gpu.named_parameters(), strict=True):
        err = (b.grad.float().cpu() - a.grad).abs().max()
        assert err <= 10 * tol * a.grad.abs().max() + 1e-6, name
