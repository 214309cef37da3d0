"""complete.json: the marker that makes a checkpoint directory count, written last and checked the
same way by everything that reads checkpoints (the trainer's resume, the universal conversion,
launch.convert / launch.generate).

A directory is complete when its marker exists and parses, every file recorded in it still has its
recorded size (a truncated or overwritten file shows), and its model-state file loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

MARKER = "complete.json"


def files_with_sizes(root: Path) -> dict[str, int]:
    """Every file under root (relative path -> bytes), the marker itself excepted."""
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def write_marker(root: Path, meta: dict[str, Any]) -> None:
    """Record meta plus the sizes of root's files, atomically (a killed writer leaves no marker)."""
    meta = {**meta, "files": files_with_sizes(root)}
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, root / MARKER)


def check_tag(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(meta, "") for a complete, intact checkpoint directory; (None, reason) otherwise."""
    marker = path / MARKER
    if not marker.is_file():
        return None, f"no {MARKER} (the save did not finish on every rank)"
    try:
        meta = json.loads(marker.read_text())
        recorded: dict[str, int] = meta["files"]
        items = list(recorded.items())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        return None, f"unreadable {MARKER}: {type(e).__name__}: {e}"
    for rel, size in items:
        f = path / rel
        if not f.is_file():
            return None, f"{rel} is missing"
        if f.stat().st_size != size:
            return None, f"{rel} is {f.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
    # ZeRO 0-2 save mp_rank_00_model_states.pt; ZeRO 3 one zero_pp_rank_R_mp_rank_00_model_states.pt per rank.
    model_files = sorted(path.glob("*mp_rank_*_model_states.pt"))
    if not model_files:
        return None, "no model-state file (*mp_rank_*_model_states.pt)"
    try:
        torch.load(model_files[0], map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is unusable
        return None, f"{model_files[0].name} does not load: {type(e).__name__}: {e}"
    return meta, ""
