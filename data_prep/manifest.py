"""The manifest (`OUT.manifest.json`): what a prep run made, from what, with which tokenizer.

Shard prefixes are stored relative to the manifest's directory so a dataset
directory can be moved as a whole; `load_manifest` resolves them. `merge_manifests`
joins the manifests of runs on several machines into one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .output_paths import check_writable_file

FORMAT = "rwkv-pretrain/binidx-manifest"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("tokenizer", "dtype", "shards")


def manifest_path(output_prefix: str | os.PathLike) -> Path:
    return Path(f"{output_prefix}.manifest.json")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """temp file, fsync, rename: readers see the old file or the whole new one, never a half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def load_manifest(path: str | os.PathLike) -> dict:
    """The manifest as a dict, each shard's `prefix` made absolute."""
    path = Path(path).resolve()
    data = read_json(path)
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: not a token-shard manifest (missing {', '.join(missing)})")
    for i, shard in enumerate(data["shards"]):
        if not isinstance(shard, dict) or "prefix" not in shard:
            raise ValueError(f"{path}: shard {i} has no 'prefix'")
        shard["prefix"] = str((path.parent / shard["prefix"]).resolve())
    return data


def _add_counts(into: dict, more: dict) -> None:
    for name, c in more.items():
        slot = into.setdefault(name, {"documents": 0, "tokens": 0})
        slot["documents"] += c["documents"]
        slot["tokens"] += c["tokens"]


def _max_token_id(shards: list[dict]) -> int | None:
    """Largest token id over the shards; None when a shard's manifest predates the field."""
    ids = [s.get("max_token_id") for s in shards]
    return None if any(i is None for i in ids) else max(ids, default=-1)


def merge_manifests(paths: list[str | os.PathLike], output: str | os.PathLike) -> dict:
    """One manifest listing the shards of all `paths`, in the order given; refuses mixed tokenizers/dtypes."""
    if not paths:
        raise ValueError("merge: no manifests given")
    check_writable_file(output, "the merged manifest (--output)")
    output = Path(output).resolve()
    loaded = [(Path(p), load_manifest(p)) for p in paths]
    first_path, first = loaded[0]
    for p, m in loaded[1:]:
        for key in ("dtype", "append_eod"):
            if m.get(key) != first.get(key):
                raise ValueError(f"{p}: {key} {m.get(key)!r} differs from {first_path}'s {first.get(key)!r}")
        if m["tokenizer"].get("identity") != first["tokenizer"].get("identity"):
            raise ValueError(
                f"{p}: tokenizer {m['tokenizer'].get('identity')} differs from "
                f"{first_path}'s {first['tokenizer'].get('identity')}; shards of different vocabularies "
                "cannot be merged"
            )
    shards, inputs, bad_files, sets = [], [], [], {}
    skipped: Counter = Counter()
    seen_prefixes: set[str] = set()
    for p, m in loaded:
        for shard in m["shards"]:
            if shard["prefix"] in seen_prefixes:
                raise ValueError(f"{p}: shard {shard['prefix']} is already listed by another manifest")
            seen_prefixes.add(shard["prefix"])
            shards.append({**shard, "prefix": os.path.relpath(shard["prefix"], output.parent)})
        inputs.extend(m.get("inputs", []))
        bad_files.extend(m.get("bad_files", []))
        skipped.update(m.get("skipped", {}))
        _add_counts(sets, m.get("pile_set_names", {}))
    merged = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": first["tokenizer"],
        "dtype": first["dtype"],
        "append_eod": first.get("append_eod", True),
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "max_token_id": _max_token_id(shards),
        "shards": shards,
        "inputs": inputs,
        "pile_set_names": dict(sorted(sets.items())),
        "skipped": dict(sorted(skipped.items())),
        "bad_files": bad_files,
        "merged_from": [os.path.relpath(Path(p).resolve(), output.parent) for p, _ in loaded],
    }
    write_json_atomic(output, merged)
    return merged
