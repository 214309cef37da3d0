"""DeepSpeed checkpoints that are complete or ignored, kept K deep, resumable at another world size.

Layout under `run_dir/checkpoints/`:

    stepN/                   engine.save_checkpoint(tag="stepN"): mp_rank_*, zero states, ...
    stepN/rng_rank{r}.pt     rank r's torch / numpy / python RNG states (client_state is rank 0's only)
    stepN/complete.json      written by rank 0 after every rank finished: step, world size, file sizes
    stepN_universal/         ds_to_universal output, made when resuming at another world size
                             (train.to_universal; its own complete.json names the source save)

A tag without `complete.json`, or whose files no longer match the sizes recorded there, or whose
model-state file does not load, is reported and skipped: resume falls back to the previous one.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train.checkpoint_marker import MARKER, check_tag, write_marker
from train.to_universal import convert as to_universal

__all__ = ["MARKER", "Candidate", "check_tag", "find_resume_point", "save", "to_universal"]

TAG_RE = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Candidate:
    step: int
    path: Path
    meta: dict[str, Any]


def find_resume_point(ckpt_dir: Path, log=print) -> Candidate | None:
    """Newest complete, intact checkpoint tag in ckpt_dir; skipped tags are reported through log."""
    if not ckpt_dir.is_dir():
        return None
    tags = []
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if m and p.is_dir():
            tags.append((int(m.group(1)), p))
    for step, path in sorted(tags, reverse=True):
        meta, reason = check_tag(path)
        if meta is not None:
            return Candidate(step, path, meta)
        log(f"checkpoint {path}: skipped, {reason}; trying the previous one")
    return None


def save(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    client_state: dict[str, Any],
    keep: int,
    rank: int,
    world_size: int,
) -> Path:
    """Save tag stepN on every rank, then mark it complete (rank 0, after a barrier) and prune."""
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0 and (path / MARKER).exists():
        (path / MARKER).unlink()  # being rewritten: not complete until this save finishes
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        write_marker(path, {"step": step, "world_size": world_size})
        prune(ckpt_dir, keep)
    dist.barrier()
    return path


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete complete tags beyond the newest `keep` (and their universal conversions)."""
    complete = sorted(
        (int(m.group(1)), p)
        for p in ckpt_dir.iterdir()
        if (m := TAG_RE.match(p.name)) and (p / MARKER).is_file()
    )
    for _, p in complete[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(p.with_name(p.name + "_universal"), ignore_errors=True)
        p.with_name(p.name + "_universal.failed").unlink(missing_ok=True)


def discard_newer(ckpt_dir: Path, step: int, log=print) -> None:
    """Move tags newer than the resume point aside (unfinished or rejected saves of an earlier attempt),
    so a later save of the same step never mixes with their files."""
    for p in list(ckpt_dir.iterdir()):
        m = TAG_RE.match(p.name)
        if m and int(m.group(1)) > step:
            target = ckpt_dir / f"rejected-{p.name}"
            shutil.rmtree(target, ignore_errors=True)
            p.rename(target)
            log(f"checkpoint {p}: newer than the resume point and unusable; moved to {target.name}")


def load_rng(path: Path, rank: int) -> bool:
    f = path / f"rng_rank{rank}.pt"
    if not f.is_file():
        return False
    set_rng_state(torch.load(f, weights_only=False))
    return True
