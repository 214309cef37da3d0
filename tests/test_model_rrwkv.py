"""RRWKV (RWKV-4 with retrospective mediums): logits against a direct pure-PyTorch evaluation of the
equations in docs/rrwkv.md, RNN mode = parallel mode, causality, no logits/loss for mediums, linear cost."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from weights import perturb

from train.config import PRESETS, ModelConfig
from train.model import RWKV
from train.models import arch_of_state_dict, rrwkv


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small shapes run fastest on one thread, and stay fast when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(seed: int = 0, **overrides) -> RWKV:
    values = {"arch": "rrwkv", "n_layer": 2, "n_embd": 32, "vocab_size": 50, "ctx_len": 64, "medium_every": 4,
              "wkv_backend": "cpu"}
    values.update(overrides)
    torch.manual_seed(seed)
    return perturb(RWKV(ModelConfig(**values)).double(), seed=seed)


# ------------------------------------------------------------------------ an independent evaluation
def _ln(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], ln.weight, ln.bias, ln.eps)


def _wkv_direct(w, u, k, v):
    """y_e = (sum_{i<e} e^{(e-1-i) w + k_i} v_i + e^{u + k_e} v_e) / (the same with v = 1), as a sum."""
    y = []
    for e in range(k.shape[0]):
        i = torch.arange(e, dtype=k.dtype)
        wt = torch.cat([torch.exp((e - 1 - i)[:, None] * w + k[:e]), torch.exp(u + k[e])[None]])
        y.append((wt * v[: e + 1]).sum(0) / wt.sum(0))
    return torch.stack(y)


@torch.no_grad()
def reference_logits(model: RWKV, idx: torch.Tensor) -> torch.Tensor:
    """docs/rrwkv.md's equations for one sequence idx (T,), written as sums over whole histories
    (no recurrence, no kernel, no interleaving helper)."""
    M, T = model.cfg.medium_every, idx.shape[0]
    n = T // M
    x = model.emb.weight[idx]
    for layer, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        if layer == 0:
            x = _ln(x, block.ln0)
        xa = _ln(x, block.ln1)
        pooled = []
        for j in range(n):
            span = xa[j * M : (j + 1) * M]
            pooled.append((torch.softmax(span @ att.medium_score.weight.T, dim=0) * span).sum(0))
        a = torch.exp(-torch.exp(att.medium_decay))
        mediums = [sum(a ** (j - i) * pooled[i] for i in range(j + 1))
                   / sum(a ** (j - i) for i in range(j + 1)) for j in range(n)]
        m_tok = torch.stack([mediums[t // M - 1] if t >= M else torch.zeros_like(xa[0]) for t in range(T)])
        xx = torch.cat([torch.zeros_like(xa[:1]), xa[:-1]])

        def mixed(mix, mix_m, cur, prev, m_tok=m_tok):
            return cur * mix[0, 0] + prev * (1 - mix[0, 0]) + (m_tok - cur) * mix_m[0, 0]

        k = mixed(att.time_mix_k, att.time_mix_mk, xa, xx) @ att.key.weight.T
        v = mixed(att.time_mix_v, att.time_mix_mv, xa, xx) @ att.value.weight.T
        r = mixed(att.time_mix_r, att.time_mix_mr, xa, xx) @ att.receptance.weight.T
        # the WKV's sequence: each medium right after its span
        ks, vs, is_token = [], [], []
        for t in range(T):
            ks.append(k[t]), vs.append(v[t]), is_token.append(True)
            if (t + 1) % M == 0:
                med = mediums[t // M]
                ks.append(med @ att.key.weight.T + att.medium_first)
                vs.append(med @ att.value.weight.T)
                is_token.append(False)
        y = _wkv_direct(-torch.exp(att.time_decay), att.time_first, torch.stack(ks), torch.stack(vs))
        y = y[torch.tensor(is_token)]
        x = x + (torch.sigmoid(r) * y) @ att.output.weight.T
        xf = _ln(x, block.ln2)
        xxf = torch.cat([torch.zeros_like(xf[:1]), xf[:-1]])
        kf = torch.relu(mixed(ffn.time_mix_k, ffn.time_mix_mk, xf, xxf) @ ffn.key.weight.T) ** 2
        rf = mixed(ffn.time_mix_r, ffn.time_mix_mr, xf, xxf) @ ffn.receptance.weight.T
        x = x + torch.sigmoid(rf) * (kf @ ffn.value.weight.T)
    return _ln(x, model.ln_out) @ model.head.weight.T


def test_logits_match_a_direct_evaluation_of_the_equations():
    model = small_model(seed=1).eval()
    idx = torch.randint(0, 50, (2, 15), generator=torch.Generator().manual_seed(1))  # 3 mediums + 3 tokens
    with torch.no_grad():
        ours = model(idx)
    for b in range(2):
        torch.testing.assert_close(ours[b], reference_logits(model, idx[b]), atol=1e-10, rtol=1e-10)


def test_rnn_mode_equals_parallel_mode_fp64_with_a_state_of_constant_size():
    """Token by token and in uneven chunks: the parallel logits (fp64, 1e-10); the state is the same
    size after 3 tokens as after 40 (running sums, no buffer)."""
    model = small_model(seed=2).eval()
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        parallel = model(idx)
        state = model.init_state(2, dtype=torch.float64)
        steps = []
        for t in range(40):
            logits, state = model.forward_rnn(idx[:, t : t + 1], state)
            steps.append(logits)
            if t == 2:
                early_shape = state.shape
        torch.testing.assert_close(torch.stack(steps, dim=1), parallel, atol=1e-10, rtol=1e-10)
        assert state.shape == early_shape == (2, rrwkv.STATE_SLOTS, 2, 32)
        state1 = model.init_state(dtype=torch.float64)
        for a, b in ((0, 7), (7, 8), (8, 31), (31, 40)):
            logits, state1 = model.forward_rnn(idx[1, a:b], state1)
            torch.testing.assert_close(logits, parallel[1, b - 1], atol=1e-10, rtol=1e-10)
        _, par_state = model.forward_with_state(idx)
    torch.testing.assert_close(state1, state[:, :, 1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(par_state, state, atol=1e-10, rtol=1e-10)


def test_last_token_pooling_rnn_equals_parallel_and_uses_no_scores():
    """medium_pool="last" (a span compressed to its last token): RNN = parallel (fp64), and changing
    the pooling scores changes nothing."""
    model = small_model(seed=8, medium_pool="last").eval()
    idx = torch.randint(0, 50, (1, 18), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        parallel = model(idx)
        state, steps = model.init_state(1, dtype=torch.float64), []
        for t in range(18):
            logits, state = model.forward_rnn(idx[:, t : t + 1], state)
            steps.append(logits)
        torch.testing.assert_close(torch.stack(steps, dim=1), parallel, atol=1e-10, rtol=1e-10)
        model.blocks[0].att.medium_score.weight.add_(1.0)
        assert torch.equal(model(idx), parallel)


def test_causality_no_position_sees_its_future_nor_a_medium_of_it():
    """Changing token p leaves every logit before p bit for bit the same (so no medium a token reads
    summarises a later token) and changes the logits from p on (so the path is there)."""
    model = small_model(seed=3).eval()
    idx = torch.randint(0, 50, (1, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(idx)
        for p in range(14):
            changed = idx.clone()
            changed[0, p] = (changed[0, p] + 1) % 50
            out = model(changed)
            assert torch.equal(out[:, :p], base[:, :p]), p
            assert not torch.equal(out[:, p], base[:, p]), p


def test_a_medium_reaches_the_tokens_after_its_span_only():
    """With the WKV and token-shift paths from token 0 all but cut (the WKV forgets at once and weighs
    the current token e^30 times the previous one; no token shift), token 0 still reaches the tokens
    after the first span through the medium, and not those before it."""
    model = small_model(seed=4).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.att.time_decay.fill_(30.0)  # w = -e^30: the WKV forgets everything at once
            block.att.time_first.fill_(30.0)
            block.att.time_mix_k.fill_(1.0), block.att.time_mix_v.fill_(1.0), block.att.time_mix_r.fill_(1.0)
            block.ffn.time_mix_k.fill_(1.0), block.ffn.time_mix_r.fill_(1.0)
        idx = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(4))
        changed = idx.clone()
        changed[0, 0] = (changed[0, 0] + 1) % 50
        diff = (model(changed) - model(idx)).abs().amax(-1)[0]
    assert torch.all(diff[1:4] < 1e-9) and torch.all(diff[4:] > 1e-4), diff


def test_mediums_give_no_logits_and_no_loss():
    """One logit row per token at any length (mediums are not outputs), so the training loss is over
    tokens only; the medium parameters still get gradients through the tokens."""
    model = small_model(seed=5)
    for T in (3, 4, 9, 16):
        idx = torch.randint(0, 50, (2, T))
        assert model(idx).shape == (2, T, 50)
    idx = torch.randint(0, 50, (2, 12))
    F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cost_is_linear_in_t(monkeypatch):
    """Matmul FLOPs (torch's FlopCounterMode, forward + backward) are exactly 6 x matmul_params per
    token at T = 32, 64, 128; the WKV op runs T + T/M steps for the tokens and T/M for the mediums."""
    from torch.utils.flop_counter import FlopCounterMode

    steps = []
    real = rrwkv.wkv_state

    def counting(time_decay, time_first, k, v, state, **kw):
        steps.append(k.shape[1])
        return real(time_decay, time_first, k, v, state, **kw)

    monkeypatch.setattr(rrwkv, "wkv_state", counting)
    model = small_model(seed=6)
    cfg = model.cfg
    for T in (32, 64, 128):
        steps.clear()
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.randint(0, 50, (2, T))).sum().backward()
        assert counter.get_total_flops() == 6 * cfg.matmul_params() * 2 * T
        assert sorted(steps) == sorted([T // 4, T + T // 4] * cfg.n_layer)


def test_forward_with_state_across_windows_and_refusal_inside_a_span():
    model = small_model(seed=7)
    idx = torch.randint(0, 50, (2, 20))
    whole, whole_state = model.forward_with_state(idx)
    first, state = model.forward_with_state(idx[:, :8])
    second, state = model.forward_with_state(idx[:, 8:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state, whole_state, atol=1e-10, rtol=1e-10)
    second.sum().backward()  # the state carries gradients into the previous window
    assert model.blocks[0].att.medium_score.weight.grad.abs().sum() > 0
    _, mid = model.forward_with_state(idx[:, :6])
    with pytest.raises(ValueError, match="inside a span of medium_every=4"):
        model.forward_with_state(idx[:, 6:], mid)


def test_sizes_names_and_registry():
    cfg = ModelConfig.from_preset("rrwkv-tiny")
    assert PRESETS["rrwkv-tiny"]["arch"] == "rrwkv" and cfg.medium_every == 32
    with torch.device("meta"):
        model = RWKV(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params()
    names = set(model.state_dict())
    assert arch_of_state_dict(names) == "rrwkv"
    assert "blocks.0.att.medium_score.weight" in names and "blocks.3.ffn.time_mix_mk" in names
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert rrwkv.config_from_shapes(shapes) == {"arch": "rrwkv", "n_layer": 4, "n_embd": 128,
                                                "vocab_size": 50277, "dim_ffn": 512, "dim_att": 128}
    a = torch.exp(-torch.exp(RWKV(ModelConfig(arch="rrwkv", n_layer=1, n_embd=8, vocab_size=5))
                             .blocks[0].att.medium_decay))
    assert math.isclose(a[0].item(), 0.5, rel_tol=1e-5) and math.isclose(a[-1].item(), 0.99, rel_tol=1e-5)
