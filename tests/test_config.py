"""ModelConfig: presets, validation, round trip, parameter and FLOP counts against independent counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from train.config import PRESETS, ModelConfig
from train.model import RWKV

# Sizes of the RWKV-4 Pile models (layers, width) as published by BlinkDL.
EXPECTED_SIZES = {
    "169m": (12, 768),
    "430m": (24, 1024),
    "1b5": (24, 2048),
    "3b": (32, 2560),
    "7b": (32, 4096),
    "14b": (40, 5120),
}


def test_presets_have_the_published_sizes():
    for name, (n_layer, n_embd) in EXPECTED_SIZES.items():
        cfg = ModelConfig.from_preset(name)
        assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (n_layer, n_embd, 50277)
        assert (cfg.dim_att, cfg.dim_ffn) == (n_embd, 4 * n_embd)
    tiny = ModelConfig.from_preset("tiny")
    assert 2 <= tiny.n_layer <= 4 and 64 <= tiny.n_embd <= 128


def test_n_params_formula_matches_published_169m_count():
    # RWKV-4-Pile-169M has 169,342,464 parameters (vocab 50277, L12, D768).
    assert ModelConfig.from_preset("169m").n_params() == 169_342_464


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError) as err:
        ModelConfig.from_preset("huge")
    for name in PRESETS:
        assert name in str(err.value)


def test_overrides_and_bad_values():
    cfg = ModelConfig.from_preset("169m", vocab_size=2048, ctx_len=512, grad_cp=True)
    assert (cfg.vocab_size, cfg.ctx_len, cfg.grad_cp, cfg.n_layer) == (2048, 512, True, 12)
    with pytest.raises(ValueError, match="no_such_field"):
        ModelConfig.from_preset("tiny", no_such_field=1)
    with pytest.raises(ValueError, match="wkv_backend"):
        ModelConfig.from_preset("tiny", wkv_backend="gpu")
    with pytest.raises(ValueError, match="n_embd"):
        ModelConfig(n_layer=2, n_embd=0)


def test_dict_round_trip():
    cfg = ModelConfig.from_preset("430m", vocab_size=65536, wkv_backend="reference")
    d = cfg.to_dict()
    assert d["n_layer"] == 24 and d["vocab_size"] == 65536
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**d, "bogus": 1})


def test_flops_per_token_counts_the_matmuls_of_a_training_step():
    """torch's FlopCounterMode counts every matmul FLOP of a real forward + backward; the config's
    formula without its WKV term must equal it exactly."""
    cfg = ModelConfig(n_layer=2, n_embd=64, vocab_size=300, ctx_len=32, wkv_backend="reference")
    model = RWKV(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    counter = FlopCounterMode(display=False)
    with counter:
        model(idx).float().sum().backward()
    tokens = idx.numel()
    wkv_term = cfg.flops_per_token() - 6 * cfg.matmul_params()
    assert 0 < wkv_term < 0.01 * cfg.flops_per_token()  # the recurrence is a small elementwise term
    assert counter.get_total_flops() == 6 * cfg.matmul_params() * tokens


def test_resume_may_change_run_settings_but_not_shapes():
    """The kernel's chunk length, checkpointing, backend and recorded ctx_len are settings, not shapes."""
    from train.config import ModelConfig

    saved = ModelConfig.from_preset("tiny", vocab_size=100, wkv_chunk_len=0, ctx_len=256).to_dict()
    now = ModelConfig.from_preset("tiny", vocab_size=100, wkv_chunk_len=512, ctx_len=4096, grad_cp=True,
                                  wkv_backend="reference")
    assert now.shape_changes(saved) == {}
    wider = ModelConfig.from_preset("tiny", vocab_size=100, n_embd=256, dim_att=256)
    assert wider.shape_changes(saved) == {"n_embd": (128, 256), "dim_att": (128, 256), "dim_ffn": (512, 1024)}
    # a checkpoint from before wkv_chunk_len existed still resumes
    legacy = {k: v for k, v in saved.items() if k != "wkv_chunk_len"}
    assert now.shape_changes(legacy) == {}
