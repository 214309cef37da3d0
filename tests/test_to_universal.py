"""train.to_universal and the one completeness check (train.checkpoint_marker) that the trainer's
resume and launch.checkpoint_io share. ds_to_universal itself runs in test_train_distributed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from launch import checkpoint_io
from train import to_universal
from train.checkpoint_marker import MARKER, check_tag, write_marker


def _tag(root: Path, step: int, world: int = 2, payload: bytes = b"x" * 100) -> Path:
    tag = root / f"step{step}"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "step": step}, tag / "mp_rank_00_model_states.pt")
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload)
    write_marker(tag, {"step": step, "world_size": world})
    return tag


@pytest.fixture
def fake_ds(monkeypatch):
    """Stand-in for the ds_to_universal subprocess: writes one file, counts calls."""
    calls = []

    def run(src: Path, out: Path, output) -> None:
        calls.append(src)
        (out / "zero").mkdir(parents=True)
        (out / "zero" / "w.pt").write_bytes(b"converted")

    monkeypatch.setattr(to_universal, "_run_ds_to_universal", run)
    return calls


def test_partial_conversion_is_removed_and_redone(tmp_path, fake_ds):
    src = _tag(tmp_path, 8)
    out = to_universal.universal_dir(src)
    (out / "zero").mkdir(parents=True)
    (out / "zero" / "half_written.pt").write_bytes(b"partial")  # killed conversion: no marker
    assert not to_universal.is_converted(src)
    to_universal.convert(src, log=lambda m: None)
    assert fake_ds == [src]
    assert not (out / "zero" / "half_written.pt").exists()
    assert (out / "mp_rank_00_model_states.pt").is_file()  # client state copied beside it
    meta, reason = check_tag(out)
    assert meta is not None, reason
    assert meta["step"] == 8 and meta["world_size"] == 2
    # done once: reused while the source save is the same one
    to_universal.convert(src, log=lambda m: None)
    assert fake_ds == [src]


def test_conversion_of_an_older_save_of_the_same_step_is_redone(tmp_path, fake_ds):
    src = _tag(tmp_path, 8)
    to_universal.convert(src, log=lambda m: None)
    # step8 discarded and saved again (another attempt): the old conversion must not be used
    (src / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"y" * 120)
    write_marker(src, {"step": 8, "world_size": 2})
    assert not to_universal.is_converted(src)
    to_universal.convert(src, log=lambda m: None)
    assert len(fake_ds) == 2 and to_universal.is_converted(src)


def test_failed_conversion_leaves_a_failure_file_and_no_marker(tmp_path, monkeypatch):
    src = _tag(tmp_path, 4)

    def boom(src, out, output):
        out.mkdir()
        raise to_universal.UniversalError("ds_to_universal failed (exit 1): no space left")

    monkeypatch.setattr(to_universal, "_run_ds_to_universal", boom)
    with pytest.raises(to_universal.UniversalError):
        to_universal.convert(src, log=lambda m: None)
    assert not (to_universal.universal_dir(src) / MARKER).exists()
    info = json.loads(to_universal.failure_file(src).read_text())
    assert info["source"] == to_universal.source_id(src) and "no space left" in info["error"]
    # a waiting rank stops with rank 0's message instead of waiting forever
    with pytest.raises(to_universal.UniversalError, match="no space left"):
        to_universal.wait_for(src, rank=1, poll_s=0.01, timeout_s=5)


def test_waiting_rank_returns_once_rank0_has_converted(tmp_path, fake_ds, capsys):
    src = _tag(tmp_path, 4)
    # a failure left by an earlier attempt on another save is not this conversion's
    to_universal.failure_file(src).write_text(json.dumps({"source": "other", "error": "old"}))
    t = threading.Timer(0.3, lambda: to_universal.convert(src, log=lambda m: None))
    t.start()
    t0 = time.monotonic()
    out = to_universal.wait_for(src, rank=1, poll_s=0.02, report_s=0.1, timeout_s=30)
    t.join()
    assert out == to_universal.universal_dir(src) and time.monotonic() - t0 >= 0.25
    text = capsys.readouterr().out
    assert "rank 1: waiting for rank 0 to convert" in text and "still waiting" in text


def test_waiting_rank_times_out_when_nothing_happens(tmp_path):
    src = _tag(tmp_path, 4)
    with pytest.raises(to_universal.UniversalError, match="not converted after"):
        to_universal.wait_for(src, rank=1, poll_s=0.01, timeout_s=0.1)


def test_cli_converts_the_newest_complete_tag(tmp_path, fake_ds, capsys):
    _tag(tmp_path, 4)
    newest = _tag(tmp_path, 8)
    (newest / MARKER).unlink()  # unfinished save: skipped
    assert to_universal.main([str(tmp_path)]) == 0
    assert fake_ds == [tmp_path / "step4"] and to_universal.is_converted(tmp_path / "step4")
    assert to_universal.main([str(tmp_path), "--tag", "step8"]) == 2
    assert "no complete.json" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["no_marker", "truncated", "missing", "model_unloadable", "bad_json"])
def test_trainer_and_converter_share_one_completeness_check(tmp_path, damage):
    """Both readers refuse the same damaged tags for the same reason and fall back to step4. A
    model-state file of the recorded size that does not load used to pass launch.checkpoint_io."""
    ckpt = tmp_path / "checkpoints"
    _tag(ckpt, 4)
    tag = _tag(ckpt, 8)
    if damage == "no_marker":
        (tag / MARKER).unlink()
    elif damage == "truncated":
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    elif damage == "missing":
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    elif damage == "model_unloadable":
        f = tag / "mp_rank_00_model_states.pt"
        f.write_bytes(b"\0" * f.stat().st_size)
    else:
        (tag / MARKER).write_text("{not json")
    meta, reason = check_tag(tag)
    assert meta is None and reason
    assert checkpoint_io._incomplete_reason(tag) == reason
    from train.checkpointing import find_resume_point

    assert find_resume_point(ckpt, log=lambda m: None).step == 4
    (ckpt / "latest").write_text("step8")
    with pytest.warns(UserWarning, match="step8: skipped"):
        assert checkpoint_io.resolve_tag_dir(ckpt) == ckpt / "step4"

