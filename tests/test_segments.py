"""Training a window in segments (train/segments.py): exactness in fp64 on CPU.

- the WKV state op: kernel (CPU twin) state gradients = the reference's autograd;
- bptt="full": loss and every parameter gradient of a window trained in segments equal those of the
  window in one piece (within 1e-10), for every architecture with ``forward_with_state``;
- bptt="truncated": equal to the computation with the state detached at every boundary.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from machine import cxx_missing

from train.config import ModelConfig
from train.loss import L2Wrap
from train.model import RWKV
from train.models import ARCH_MODULES
from train.segments import detach, leaves, segment_slices, train_window
from train.wkv import wkv_state

TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cpu_twin_or_skip():
    if cxx_missing() is not None:
        pytest.skip(f"the CPU twin cannot be built: {cxx_missing()}")


def _archs() -> list[str]:
    """Architectures whose module exists on this branch (RWKV-7 lands separately)."""
    import importlib.util

    return [a for a, mod in ARCH_MODULES.items() if importlib.util.find_spec(mod) is not None]


# ------------------------------------------------------------------------------------------ the WKV op
def _wkv_inputs(B=2, T=9, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    td = torch.linspace(-5.0, 3.0, C, dtype=torch.float64)
    tf = torch.randn(C, generator=g, dtype=torch.float64) * 0.5 - 1.0
    k = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * 10).clamp(-30, 30)
    k[:, ::4] = 30.0  # extreme keys: the running maximum (pp) moves
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    with torch.no_grad():  # a non-trivial carried state: the history of some earlier steps
        _, s0 = wkv_state(td, tf, k[:, :5] * 0.7, v[:, :5], backend="reference")
    return td, tf, k, v, s0


@pytest.mark.parametrize("chunk", [None, 4])
def test_wkv_state_kernel_matches_reference_autograd(chunk):
    _cpu_twin_or_skip()
    td, tf, k, v, s0 = _wkv_inputs()
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(k.shape, generator=g, dtype=torch.float64)
    ga, gb = (torch.randn(k.shape[0], k.shape[2], generator=g, dtype=torch.float64) for _ in range(2))

    def run(backend):
        ins = [x.detach().clone().requires_grad_(True) for x in (td, tf, k, v, s0)]
        y, s = wkv_state(*ins[:4], ins[4], backend=backend, chunk_len=chunk)
        ((y * gy).sum() + (s[0] * ga).sum() + (s[1] * gb).sum()).backward()
        return [y, s] + [x.grad for x in ins]

    for got, want in zip(run("cpu"), run("reference"), strict=True):
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        assert err < 1e-12
    assert (run("cpu")[-1][2] == 0).all()  # pp carries no gradient


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_wkv_state_chained_equals_one_call(backend):
    """Two calls with the state handed over (and its gradient handed back) = one call."""
    if backend == "cpu":
        _cpu_twin_or_skip()
    td, tf, k, v, _ = _wkv_inputs(T=12)
    gy = torch.randn(k.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run(split):
        ins = [x.detach().clone().requires_grad_(True) for x in (td, tf, k, v)]
        if split:
            y1, s = wkv_state(ins[0], ins[1], ins[2][:, :split], ins[3][:, :split], backend=backend)
            y2, _ = wkv_state(ins[0], ins[1], ins[2][:, split:], ins[3][:, split:], s, backend=backend)
            y = torch.cat([y1, y2], 1)
        else:
            y, _ = wkv_state(*ins, backend=backend)
        (y * gy).sum().backward()
        return [y] + [x.grad for x in ins]

    whole = run(0)
    for split in (1, 5, 11):
        for got, want in zip(run(split), whole, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------ the models
def _model(arch: str, backend: str, grad_cp: bool = False) -> RWKV:
    if backend == "cpu":
        _cpu_twin_or_skip()
    torch.manual_seed(0)
    common = {"n_layer": 2, "vocab_size": 64, "ctx_len": 16, "grad_cp": grad_cp}
    if arch == "rwkv4":
        cfg = ModelConfig(n_embd=16, wkv_backend=backend, **common)
    elif arch == "rrwkv":  # a medium every 4 tokens: the segments below are multiples of 4
        cfg = ModelConfig(arch="rrwkv", n_embd=16, medium_every=4, wkv_backend=backend, **common)
    else:
        # head size 64: the width the WKV-7/WKV-6 kernels (and their CPU twins) are built for
        cfg = ModelConfig.from_preset(f"{arch}-tiny", n_embd=64, head_size=64, wkv_backend=backend, **common)
    model = RWKV(cfg).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # fresh inits zero several projections: make every gradient non-trivial
        for p in model.parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() == 2:
                p.add_(r / math.sqrt(p.shape[1]) * 0.5)
            else:
                p.add_(0.1 * r)
    return model


def lm_loss(logits, targets, l2wrap):
    """train.loss.lm_loss in the logits' dtype (the trainer's computes in fp32; fp64 here)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return (L2Wrap.apply(ce, logits) if l2wrap else ce), ce


def _window(B=2, T=48, V=64, seed=4):
    tokens = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def _grads(model):
    """Gradients by name; None for a parameter the forward does not use (RWKV-7 layer 0's v LoRA)."""
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _one_piece(model, idx, targets, l2wrap):
    model.zero_grad(set_to_none=True)
    loss, ce = lm_loss(model(idx), targets, l2wrap)
    loss.backward()
    return ce.item(), _grads(model)


def _segmented(model, idx, targets, ctx_len, bptt, l2wrap):
    """As the trainer drives it: the backward divides by the number of segments (DeepSpeed's 1/GAS)."""
    model.zero_grad(set_to_none=True)
    n = idx.shape[1] // ctx_len
    losses = train_window(model.forward_with_state, idx, targets, ctx_len, bptt,
                          lambda logits, t: lm_loss(logits, t, l2wrap),
                          lambda objective: (objective / n).backward(), grad_scale=1.0 / n)
    return sum(x.item() for x in losses) / n, _grads(model)


def _assert_same(got, want, tol=TOL):
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    assert abs(loss_a - loss_b) < tol
    assert grads_a.keys() == grads_b.keys()
    assert sum(g is not None for g in grads_b.values()) > len(grads_b) * 0.8
    for name in grads_b:
        if grads_b[name] is None:
            assert grads_a[name] is None, name
            continue
        err = (grads_a[name] - grads_b[name]).abs().max().item()
        assert err < tol, f"{name}: {err}"
        assert grads_b[name].abs().max() > 0 or "ln0" in name, f"{name}: zero gradient tests nothing"


@pytest.mark.parametrize("arch", _archs())
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("ctx_len", [16, 12])
def test_full_bptt_equals_one_piece(arch, backend, ctx_len):
    model = _model(arch, backend)
    idx, targets = _window()
    want = _one_piece(model, idx, targets, l2wrap=True)
    _assert_same(_segmented(model, idx, targets, ctx_len, "full", l2wrap=True), want)


@pytest.mark.parametrize("arch", _archs())
def test_full_bptt_with_grad_cp(arch):
    model = _model(arch, "reference", grad_cp=True)
    idx, targets = _window(T=32)
    want = _one_piece(model, idx, targets, l2wrap=False)
    _assert_same(_segmented(model, idx, targets, 8, "full", l2wrap=False), want)


@pytest.mark.parametrize("arch", _archs())
def test_truncated_bptt_equals_detached_computation(arch):
    model = _model(arch, "reference")
    idx, targets = _window(T=36)
    ctx_len, n = 12, 3
    # The detached computation written out: one graph, the state cut at each boundary.
    model.zero_grad(set_to_none=True)
    total, state = 0.0, None
    for sl in segment_slices(36, ctx_len):
        logits, state = model.forward_with_state(idx[:, sl], state)
        total = total + lm_loss(logits, targets[:, sl], True)[0] / n
        state = detach(state)
    total.backward()
    want = (total.item(), _grads(model))
    got = _segmented(model, idx, targets, ctx_len, "truncated", l2wrap=True)
    _assert_same(got, want)
    # and it is not the full gradient (the boundaries do cut something)
    full = _segmented(model, idx, targets, ctx_len, "full", l2wrap=True)
    assert abs(full[0] - got[0]) < TOL
    assert max((full[1][k] - got[1][k]).abs().max().item() for k in got[1] if got[1][k] is not None) > 1e-6


@pytest.mark.parametrize("arch", _archs())
def test_forward_with_state_continues_the_sequence(arch):
    model = _model(arch, "reference")
    idx, _ = _window(T=20)
    with torch.no_grad():
        whole = model(idx)
        cut = 8 if arch == "rrwkv" else 7  # RRWKV's parallel mode starts at a span boundary
        a, s = model.forward_with_state(idx[:, :cut])
        b, _ = model.forward_with_state(idx[:, cut:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=0, atol=1e-12)
    assert all(t.dtype == torch.float64 for t in leaves(s))


def test_segment_slices_refuses_a_partial_segment():
    assert segment_slices(8, 4) == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ValueError, match="multiple"):
        segment_slices(10, 4)
    with pytest.raises(ValueError, match="bptt"):
        train_window(None, torch.zeros(1, 4), torch.zeros(1, 4), 2, "tbptt", None, None)


# ------------------------------------------------------------------------------------------ config, buckets
def _run_config(*sets):
    from train.run_config import load_run_config

    return load_run_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", list(sets))


def test_config_keys_and_deepspeed_accumulation():
    from train.ds_config import fill_ds_config, load_ds_config
    from train.run_config import ConfigError

    cfg = _run_config()
    assert (cfg.train.seq_len, cfg.train.window, cfg.train.n_segments, cfg.train.bptt) == (0, 64, 1, "full")
    cfg = _run_config("train.seq_len=256", "train.grad_accum=3", "train.bptt=truncated")
    assert (cfg.train.window, cfg.train.n_segments) == (256, 4)
    assert cfg.tokens_per_step(2) == 4 * 3 * 2 * 256
    ds = fill_ds_config(load_ds_config(Path(__file__).parents[1] / "ds_config.json"), cfg, 2)
    assert ds["gradient_accumulation_steps"] == 12  # one micro-step per segment
    assert ds["train_batch_size"] == 4 * 12 * 2
    with pytest.raises(ConfigError, match="multiple of train.ctx_len"):
        _run_config("train.seq_len=100")
    with pytest.raises(ConfigError, match="bptt"):
        _run_config("train.seq_len=128", "train.bptt=tbptt")
    with pytest.raises(ConfigError, match="bf16 or fp32"):
        _run_config("train.seq_len=128", "train.precision=fp16")
    _run_config("train.seq_len=128", "train.precision=fp16", "train.bptt=truncated")  # truncated: fine


def test_position_buckets():
    from train.val_positions import bucket_edges, bucket_names, buckets

    assert bucket_edges(65536) == [0, 1024, 4096, 16384, 65536]
    assert bucket_names(bucket_edges(16384)) == ["0-1k", "1k-4k", "4k-16k"]
    assert bucket_edges(4096) == [0, 1024, 4096]
    assert bucket_edges(256) == [0, 16, 64, 256]
    assert bucket_edges(1) == [0, 1]
    per_pos = [float(i < 16) for i in range(256)]
    assert buckets(per_pos) == {"0-16": 1.0, "16-64": 0.0, "64-256": 0.0}


def test_position_plot(tmp_path):
    """The PNG, when matplotlib is there; a log line (not an error) when it is not."""
    from train.val_positions import PLOT_NAME, plot

    lines = []
    path = plot(tmp_path, [5.0 - i / 300 for i in range(1024)], 7, lines.append)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert path is None and "matplotlib is not installed" in lines[0]
        return
    assert path == tmp_path / PLOT_NAME and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
