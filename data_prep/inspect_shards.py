"""`python -m data_prep inspect PREFIX_OR_MANIFEST`: counts, size statistics and decoded samples."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .binidx import MMapIndexedDataset
from .manifest import load_manifest, manifest_path


def _find_manifest(target: str) -> Path | None:
    if target.endswith(".json"):
        return Path(target)
    p = manifest_path(target)
    return p if p.is_file() else None


def _decodable(ids: np.ndarray, vocab_size: int, prefix: str, i: int, spec: str) -> list[int]:
    """The ids of document i, refused when the tokenizer has no piece for one (decoders crash on it)."""
    top = int(ids.max()) if ids.size else -1
    if top >= vocab_size:
        raise ValueError(
            f"{prefix}: document {i} holds token id {top}, outside tokenizer {spec}'s vocabulary of "
            f"{vocab_size} (a corrupt shard, or another tokenizer: pass --tokenizer, or --samples 0 for "
            "counts only)"
        )
    return ids.tolist()


def inspect(target: str, tokenizer_spec: str | None = None, samples: int = 2, chars: int = 300) -> str:
    """A human-readable report on a binidx prefix or a manifest's shards."""
    man = _find_manifest(target)
    manifest = load_manifest(man) if man else None
    prefixes = [s["prefix"] for s in manifest["shards"]] if manifest else [target]
    lines: list[str] = []
    if manifest:
        t = manifest["tokenizer"]
        lines.append(f"manifest {man}: {len(prefixes)} shard(s), tokenizer {t.get('spec')} "
                     f"(vocab {t.get('vocab_size')}, eod {t.get('eod_id')}), dtype {manifest['dtype']}")
        if manifest.get("skipped"):
            lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items()))
    tok = None
    spec = tokenizer_spec or (manifest["tokenizer"].get("spec") if manifest else None)
    if spec and samples:
        from .tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(spec)
        except (OSError, ValueError) as e:
            lines.append(f"(no decoded samples: {e})")
    total_docs = total_tokens = 0
    for prefix in prefixes:
        ds = MMapIndexedDataset(prefix)
        sizes = np.asarray(ds.sizes)
        total_docs += len(ds)
        total_tokens += ds.n_tokens
        stats = f"min {sizes.min()} / mean {sizes.mean():.1f} / max {sizes.max()}" if len(sizes) else "empty"
        lines.append(f"{prefix}: {len(ds)} documents, {ds.n_tokens} tokens, {ds.dtype}, "
                     f"tokens per doc {stats}")
        if tok is not None:
            for i in range(min(samples, len(ds))):
                text = tok.decode(_decodable(ds[i], tok.vocab_size, prefix, i, spec))
                lines.append(f"  [{i}] {text[:chars]!r}{' ...' if len(text) > chars else ''}")
    lines.append(f"total: {total_docs} documents, {total_tokens} tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep inspect",
                                description="Print counts and decode a sample of a binidx dataset.")
    p.add_argument("target", help="binidx prefix (PREFIX.bin/.idx) or a .manifest.json")
    p.add_argument("--tokenizer", default=None, help="tokenizer to decode with (default: the manifest's)")
    p.add_argument("--samples", type=int, default=2, help="documents to decode per shard")
    p.add_argument("--chars", type=int, default=300, help="characters shown per decoded document")
    a = p.parse_args(argv)
    try:
        print(inspect(a.target, a.tokenizer, a.samples, a.chars))
    except (OSError, ValueError) as e:
        print(f"data_prep inspect: error: {e}", file=sys.stderr)
        return 2
    return 0
