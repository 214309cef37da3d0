"""Weighted data mixtures (`data.weights`): the schedule, world-size independence, the unweighted
path unchanged, and a real 2-process run killed and resumed with per-source token counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from train.data import MIX_BLOCK, TokenWindows, WeightedMixture, block_schedule, open_windows, source_quotas
from train.run_config import ConfigError, config_from_dict


@pytest.fixture(scope="session")
def two_manifests(demo_shards) -> list[str]:
    """The demo's two shards as two manifests, `plays` (shard 0) and `sonnets` (shard 1), next to
    the demo manifest (shard prefixes are relative to the manifest's directory)."""
    src = Path(demo_shards)
    whole = json.loads(src.read_text())
    out = []
    for name, shard in zip(("plays", "sonnets"), whole["shards"], strict=True):
        path = src.with_name(f"{name}.manifest.json")
        path.write_text(json.dumps({**whole, "shards": [shard]}))
        out.append(str(path))
    return out


def test_quotas_sum_to_the_block_and_follow_the_weights():
    q = source_quotas([6, 3, 1])
    assert q.sum() == MIX_BLOCK and np.abs(q / MIX_BLOCK - [0.6, 0.3, 0.1]).max() <= 1 / MIX_BLOCK
    src, idx = block_schedule(q)
    for i, n in enumerate(q):  # each source's samples numbered 0..n-1 in order
        assert (idx[src == i] == np.arange(n)).all()
    # every prefix of the block is within one sample of each weight's share
    counts = np.stack([np.cumsum(src == i) for i in range(3)], axis=1)
    ideal = np.arange(1, MIX_BLOCK + 1)[:, None] * (q / MIX_BLOCK)
    assert np.abs(counts - ideal).max() < 1.0


def test_realised_proportions_match_weights(two_manifests):
    w = [0.7, 0.3]
    data = WeightedMixture([Path(m) for m in two_manifests], w, ctx_len=64, val_documents=8)
    for n in (100, 1000, 12_345, 3 * MIX_BLOCK + 17):
        got = data.samples_by_source(n)
        assert got.sum() == n
        assert got.tolist() == np.bincount([data.source_of(g)[0] for g in range(n)], minlength=2).tolist()
        for p, c in zip(w, got, strict=True):
            # within 3 sigma of a binomial draw (the schedule is far tighter: within a sample or two)
            assert abs(c - n * p) <= 3 * math.sqrt(n * p * (1 - p)) + 1, (n, got)
    # each source is read in its own magic-prime order: an epoch of the source is a permutation
    plays = data.sources[0]
    ks = [k for i, k in (data.source_of(g) for g in range(int(plays.prime / 0.7) + 50)) if i == 0]
    assert ks[: plays.prime] == list(range(plays.prime))
    plays_n, sonnets_n = data.samples_by_source(1000).tolist()
    assert data.tokens_by_source(1000) == {"plays": plays_n * 64, "sonnets": sonnets_n * 64}


def test_same_global_batch_for_world_sizes_1_2_4(two_manifests):
    data = WeightedMixture([Path(m) for m in two_manifests], [0.25, 0.75], ctx_len=64, val_documents=8)
    data.limit_vocab(2048)
    global_batch = 16
    for step in (0, 5, 4097):  # 4097 * 16 crosses a schedule block
        sets = []
        for world in (1, 2, 4):
            micro, accum = 4, global_batch // (4 * world)
            rows = [tuple(r.tolist()) for rank in range(world) for m in range(accum)
                    for r in data.batch(step, m, rank, world, micro, accum)]
            assert len(rows) == global_batch
            sets.append(sorted(rows))
        assert sets[0] == sets[1] == sets[2]
        want = sorted(tuple(data.sample(g).tolist()) for g in range(step * 16, step * 16 + 16))
        assert sets[0] == want


def test_no_weights_is_todays_pool_exactly(two_manifests):
    paths = [Path(m) for m in two_manifests]
    old = TokenWindows(paths, ctx_len=64, val_documents=8, seed=3)
    new = open_windows(paths, 64, 8, 3, [])
    assert type(new) is TokenWindows
    for step in (0, 7):
        assert (new.batch(step, 0, 1, 2, 4, 1) == old.batch(step, 0, 1, 2, 4, 1)).all()
    # one manifest with a weight reads exactly the unweighted windows too
    one = WeightedMixture(paths[:1], [1.0], ctx_len=64, val_documents=8, seed=3)
    ref = TokenWindows(paths[:1], ctx_len=64, val_documents=8, seed=3)
    for g in (0, 1, 999, MIX_BLOCK + 5):
        assert (one.sample(g) == ref.sample(g)).all()


def test_validation_is_the_last_manifests_and_bad_ids_name_the_shard(two_manifests):
    paths = [Path(m) for m in two_manifests]
    data = WeightedMixture(paths, [0.5, 0.5], ctx_len=64, val_documents=8)
    ref = TokenWindows(paths[1:], ctx_len=64, val_documents=8)
    assert data.sources[0].val_tokens.size == 0
    got, want = data.val_batches(0, 2, 4, 2), ref.val_batches(0, 2, 4, 2)
    assert [b.tolist() for b in got] == [b.tolist() for b in want]
    data.limit_vocab(2048)
    # a shard whose manifest's max_token_id is right but whose tokens are not: lower the limit past
    # the manifest check, so every real id is "outside the vocabulary" for the per-batch check
    data.vocab_limit = 5
    for s in data.sources:
        s.vocab_limit = 5
    with pytest.raises(ConfigError, match=r"data: shard .* holds token id"):
        data.batch(0, 0, 0, 1, 4, 1)


def test_weights_config_checked():
    base = {"data": {"manifests": ["a.json", "b.json"]}}
    assert config_from_dict(base).data.weights == []
    cfg = config_from_dict({"data": {**base["data"], "weights": [3, 1]}})
    assert cfg.data.weights == [3.0, 1.0]
    for bad, msg in (([1.0], "2 data.manifests"), ([1, 0], "positive"), ([1, "x"], "positive"),
                     ([1, float("nan")], "positive")):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({"data": {**base["data"], "weights": bad}})


@pytest.mark.slow
def test_two_process_weighted_run_resumes_exactly(two_manifests, tmp_path):
    """2 processes, ZeRO 2, weights 0.3/0.7: killed after the step-8 checkpoint and resumed, the
    metrics (losses, tokens per source) equal an uninterrupted run's exactly."""
    from test_train_distributed import (
        EVERY,
        STEPS,
        _assert_same_metrics,
        _cmd,
        _kill_after,
        _run,
        _train_records,
    )

    manifests = ",".join(two_manifests)
    sets = ("data.weights=[0.3,0.7]",)
    ref = tmp_path / "ref"
    text = _run(_cmd(2, ref, manifests, *sets), tmp_path / "ref.log")
    assert "data: mixture of 2 manifests" in text
    assert "plays: weight 0.300" in text and "sonnets: weight 0.700" in text and "epochs over the run" in text

    run_dir = tmp_path / "killed"
    killed_at = _kill_after(_cmd(2, run_dir, manifests, *sets, "train.steps=1000"), tmp_path / "killed.log",
                            run_dir, min_step=2 * EVERY + 1, min_ckpt=2 * EVERY)
    assert killed_at < STEPS
    text = _run(_cmd(2, run_dir, manifests, *sets), tmp_path / "resumed.log")
    assert f"at step {2 * EVERY}" in text
    _assert_same_metrics(ref, run_dir)

    recs, resumed = _train_records(ref), _train_records(run_dir)
    assert sorted(recs) == sorted(resumed) == list(range(1, STEPS + 1))
    mix = WeightedMixture([Path(m) for m in two_manifests], [0.3, 0.7], ctx_len=64, val_documents=8)
    for step, r in recs.items():
        assert r["tokens_by_source"] == resumed[step]["tokens_by_source"]
        assert sum(r["tokens_by_source"].values()) == r["tokens"]
        assert r["tokens_by_source"] == mix.tokens_by_source(step * 8)  # 8 samples per step
    final = recs[STEPS]["tokens_by_source"]
    assert abs(final["plays"] / recs[STEPS]["tokens"] - 0.3) < 0.02
