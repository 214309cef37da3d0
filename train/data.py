"""Training windows over memory-mapped token shards, in RWKV-LM's "magic prime" order.

The shards of one or more data_prep manifests are cut into `ctx_len`-token chunks; sample `g`
reads the `ctx_len + 1` tokens starting at a chunk (inputs and next-token targets). The order is
RWKV-LM v4neo's (`src/dataset.py`, `my_pile_stage > 0`): with `p` the largest prime not above the
number of chunks such that `p % 3 == 2`, sample `g` of an epoch of `p` samples reads chunk

    (factor * ii**3) mod p,   ii = (g + 1 + seed) mod p,   factor = int(p * (sqrt(5) - 1) / 2)

Cubing is a bijection modulo such a prime, so every chunk below `p` is read exactly once per epoch,
in a scattered order, with no state to save: the data position is just the sample counter. Later
epochs multiply `factor` by `epoch + 1` (still a bijection, another order).

Sample numbers are laid out so that each rank reads a disjoint slice, and so that the same global
batch is read whatever the split between processes and gradient accumulation (which is what lets
a run resume at another world size on the same data): micro-batch `m` of optimizer step `s` on
rank `r` holds samples `((s * grad_accum + m) * world + r) * micro_batch + b`.

Validation: the last `val_documents` documents of the last shard are held out of training and
read as consecutive non-overlapping windows.

Weighted mixtures (`data.weights`, WeightedMixture): each manifest keeps its own windows and
magic-prime order, and a fixed schedule over the global sample number picks the manifest of each
sample; without weights every manifest is one pool, as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.run_config import ConfigError


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def magic_prime(n_chunks: int) -> int:
    """Largest prime p <= n_chunks with p % 3 == 2 (RWKV-LM's `magic_prime`)."""
    for p in range(n_chunks, 1, -1):
        if p % 3 == 2 and is_prime(p):
            return p
    raise ValueError(f"no prime p <= {n_chunks} with p % 3 == 2")


@dataclass
class Shard:
    prefix: Path
    tokens: np.ndarray  # flat memmap of the .bin
    train_tokens: int  # tokens usable for training (a prefix of the shard)


def _load_manifests(paths: list[Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from data_prep.manifest import load_manifest

    manifests = []
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"data manifest {p}: file not found (run `python -m data_prep` first)")
        try:
            manifests.append(load_manifest(p))
        except (ValueError, OSError, KeyError) as e:
            raise ConfigError(f"data manifest {p}: {e}") from None
    first = manifests[0]["tokenizer"]
    for p, m in zip(paths[1:], manifests[1:], strict=True):
        if m["tokenizer"].get("identity") != first.get("identity"):
            raise ConfigError(
                f"data manifest {p}: tokenizer {m['tokenizer'].get('spec')!r} "
                f"(identity {m['tokenizer'].get('identity')}) differs from {paths[0]}'s "
                f"{first.get('spec')!r} (identity {first.get('identity')}); all manifests of a run "
                "must use the same tokenizer"
            )
    return manifests, first


def _check_enough_documents(manifest_paths: list[Path], opened: list[tuple[Path, Any]],
                            val_documents: int) -> None:
    """Say what is wrong with an empty or too small dataset, in terms the user can act on."""
    names = ", ".join(str(p) for p in manifest_paths)
    if sum(len(ds) for _, ds in opened) == 0:
        raise ConfigError(
            f"data: the shards of {names} hold no documents (the prep run wrote none); "
            "run data_prep on inputs with text"
        )
    last_prefix, last = opened[-1]
    if val_documents and len(last) == 0:
        raise ConfigError(
            f"data: the last shard {last_prefix} holds no documents, and validation documents are taken "
            "from the end of the last shard; set data.val_documents: 0 or leave that shard out"
        )
    if val_documents >= len(last) > 0:
        raise ConfigError(
            f"data: data.val_documents={val_documents} would hold out every one of the {len(last)} "
            f"documents of the last shard {last_prefix} (validation comes from the end of the last "
            f"shard); set data.val_documents to at most {len(last) - 1}, or 0"
        )


def first_sample(step: int, micro: int, rank: int, world: int, micro_batch: int, grad_accum: int) -> int:
    """Global number of the first sample of one micro-batch of one rank: the numbering every reader
    shares, so a step reads the same samples at any world size / grad_accum split."""
    return ((step * grad_accum + micro) * world + rank) * micro_batch


def micro_batch_reader(
    batch: Callable[..., torch.Tensor], rank: int, world: int, micro_batch: int, grad_accum: int
) -> Callable[[int], torch.Tensor]:
    """`batch` numbered by micro-batch k = step * grad_accum + micro: what train.prefetch reads ahead."""
    return lambda k: batch(k // grad_accum, k % grad_accum, rank, world, micro_batch, grad_accum)


class TokenWindows:
    """Deterministic `ctx_len + 1` windows over the shards of one or more manifests."""

    def __init__(self, manifest_paths: list[Path], ctx_len: int, val_documents: int = 0, seed: int = 0):
        from data_prep.binidx import MMapIndexedDataset

        self.ctx_len = ctx_len
        self.seed = seed
        manifests, self.tokenizer = _load_manifests(manifest_paths)
        self.vocab_size = int(self.tokenizer["vocab_size"])
        opened: list[tuple[Path, Any]] = []
        # (manifest, shard, largest token id recorded at prep time; None in older manifests)
        self.recorded_max_ids: list[tuple[Path, Path, int | None]] = []
        self.vocab_limit: int | None = None  # set by limit_vocab(); every batch is checked against it
        for mpath, m in zip(manifest_paths, manifests, strict=True):
            if not m.get("shards"):
                raise ConfigError(f"data manifest {mpath}: lists no shards")
            for entry in m["shards"]:
                try:
                    # lazy: each rank checks the entries it reads, not the whole index (see binidx)
                    ds = MMapIndexedDataset(entry["prefix"], lazy=True)
                except (FileNotFoundError, ValueError) as e:
                    raise ConfigError(f"data manifest {mpath}: shard {entry['prefix']}: {e}") from None
                if "documents" in entry and len(ds) != int(entry["documents"]):
                    raise ConfigError(
                        f"data manifest {mpath}: shard {entry['prefix']} has {len(ds)} documents, "
                        f"the manifest says {entry['documents']} (shard and manifest are from different runs)"
                    )
                if "tokens" in entry and ds.n_tokens != int(entry["tokens"]):
                    raise ConfigError(
                        f"data manifest {mpath}: shard {entry['prefix']} has {ds.n_tokens} tokens, "
                        f"the manifest says {entry['tokens']} (shard and manifest are from different runs)"
                    )
                if "dtype" in m and np.dtype(m["dtype"]) != ds.dtype:
                    raise ConfigError(
                        f"data manifest {mpath}: shard {entry['prefix']} holds {ds.dtype}, "
                        f"the manifest says {m['dtype']}"
                    )
                opened.append((Path(entry["prefix"]), ds))
                self.recorded_max_ids.append((mpath, Path(entry["prefix"]), entry.get("max_token_id")))

        _check_enough_documents(manifest_paths, opened, val_documents)
        last_prefix, last = opened[-1]
        self.shards: list[Shard] = []
        for prefix, ds in opened:
            self.shards.append(Shard(prefix, ds.tokens, ds.n_tokens))
        if val_documents > 0:
            try:  # the index entries this reads: where the held-out documents start
                last.validate(len(last) - val_documents, len(last))
            except ValueError as e:
                raise ConfigError(f"data: shard {last_prefix}: {e}") from None
            cut = int(last.pointers[len(last) - val_documents]) // last.dtype.itemsize
            self.shards[-1].train_tokens = cut
            self.val_tokens = last.tokens[cut:]
        else:
            self.val_tokens = last.tokens[:0]

        counts = [max(0, (s.train_tokens - 1) // ctx_len) for s in self.shards]
        self.chunk_starts = np.cumsum([0] + counts)  # chunk id -> shard via searchsorted
        self.n_chunks = int(self.chunk_starts[-1])
        if self.n_chunks < 5:
            train_tokens = sum(sh.train_tokens for sh in self.shards)
            raise ConfigError(
                f"data: only {self.n_chunks} training windows of {ctx_len + 1} tokens in "
                f"{', '.join(str(p) for p in manifest_paths)} ({train_tokens} training tokens after "
                f"{val_documents} validation documents); at least 5 are needed: prepare more data, "
                "or lower train.ctx_len or data.val_documents"
            )
        self.prime = magic_prime(self.n_chunks)
        self.factor = int(self.prime * (math.sqrt(5) - 1) / 2)
        self.n_val_windows = max(0, (len(self.val_tokens) - 1) // ctx_len)

    # ------------------------------------------------------------------------------------ token ids
    def limit_vocab(self, vocab_size: int) -> None:
        """Refuse shards whose recorded largest token id has no embedding row, and check every batch
        from now on: an id past the vocabulary would otherwise end the run inside F.embedding."""
        for mpath, prefix, top in self.recorded_max_ids:
            if top is not None and int(top) >= vocab_size:
                raise ConfigError(
                    f"data manifest {mpath}: shard {prefix} holds token id {top}, outside the model's "
                    f"vocabulary of {vocab_size} (ids 0..{vocab_size - 1}); prepare the data with the "
                    "model's tokenizer, or raise model.vocab_size"
                )
        self.vocab_limit = vocab_size

    def _check_ids(self, rows: np.ndarray, where: Callable[[int], tuple[int, int]]) -> None:
        """One max() and one min() over the int64 batch, before it becomes a tensor (no device sync).
        `where(i)`: (shard index, first token) of row i, only asked for to name a bad shard."""
        limit = self.vocab_limit
        if limit is None or (rows.max() < limit and rows.min() >= 0):
            return
        for i, row in enumerate(rows):
            bad = np.flatnonzero((row < 0) | (row >= limit))
            if bad.size:
                s, start = where(i)
                prefix = self.shards[s].prefix
                raise ConfigError(
                    f"data: shard {prefix} holds token id {int(row[bad[0]])} at token {start + int(bad[0])}, "
                    f"outside the model's vocabulary of {limit} (ids 0..{limit - 1}); the shard is "
                    f"corrupt or from another tokenizer (see `python -m data_prep inspect {prefix}`)"
                )

    # ------------------------------------------------------------------------------------ train
    def chunk_of(self, g: int) -> int:
        """Chunk read by global sample number g."""
        p = self.prime
        epoch, pos = divmod(g, p)
        ii = (pos + 1 + self.seed) % p
        factor = (self.factor * (epoch + 1)) % p or 1
        return (factor * pow(ii, 3, p)) % p

    def locate(self, chunk: int) -> tuple[int, int]:
        """(shard index, first token) of a chunk."""
        s = int(np.searchsorted(self.chunk_starts, chunk, side="right")) - 1
        return s, (chunk - int(self.chunk_starts[s])) * self.ctx_len

    def window(self, chunk: int) -> np.ndarray:
        s, start = self.locate(chunk)
        return np.asarray(self.shards[s].tokens[start : start + self.ctx_len + 1], dtype=np.int64)

    def sample(self, g: int) -> np.ndarray:
        return self.window(self.chunk_of(g))

    def batch(
        self, step: int, micro: int, rank: int, world: int, micro_batch: int, grad_accum: int
    ) -> torch.Tensor:
        """(micro_batch, ctx_len + 1) int64 tokens for one micro-batch of one rank."""
        base = first_sample(step, micro, rank, world, micro_batch, grad_accum)
        chunks = [self.chunk_of(base + b) for b in range(micro_batch)]
        rows = np.stack([self.window(c) for c in chunks])
        self._check_ids(rows, lambda i: self.locate(chunks[i]))
        return torch.from_numpy(rows)

    def micro_batches(
        self, rank: int, world: int, micro_batch: int, grad_accum: int
    ) -> Callable[[int], torch.Tensor]:
        return micro_batch_reader(self.batch, rank, world, micro_batch, grad_accum)

    # ------------------------------------------------------------------------------------ validation
    def val_batches(self, rank: int, world: int, micro_batch: int, max_batches: int) -> list[torch.Tensor]:
        """This rank's share of the validation windows: up to max_batches micro-batches, the same
        number and sizes on every rank (ZeRO 3 gathers weights collectively in each forward)."""
        ctx = self.ctx_len
        usable = (self.n_val_windows // world) * world
        ids = list(range(rank, usable, world))[: max_batches * micro_batch]
        out = []
        last, offset = len(self.shards) - 1, self.shards[-1].train_tokens  # val_tokens' place in its shard
        for i in range(0, len(ids), micro_batch):
            window_ids = ids[i : i + micro_batch]
            rows = np.stack([np.asarray(self.val_tokens[k * ctx : k * ctx + ctx + 1], dtype=np.int64)
                             for k in window_ids])
            self._check_ids(rows, lambda i, w=window_ids: (last, offset + w[i] * ctx))
            out.append(torch.from_numpy(rows))
        return out


# ---------------------------------------------------------------------------------- weighted mixtures
MIX_BLOCK = 1 << 16  # global samples per schedule block: weights are kept to 1/65536


def source_quotas(weights: list[float], block: int = MIX_BLOCK) -> np.ndarray:
    """Samples of each source per block: the normalised weights times `block`, rounded by largest
    remainder so that they sum to `block` exactly (ties to the earlier source)."""
    w = np.asarray(weights, dtype=np.float64)
    ideal = w / w.sum() * block
    quotas = np.floor(ideal).astype(np.int64)
    short = block - int(quotas.sum())
    order = np.argsort(-(ideal - quotas), kind="stable")
    quotas[order[:short]] += 1
    return quotas


def block_schedule(quotas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, index among that source's samples in the block) of each position of one block.

    Source i's n_i samples sit at their evenly spaced ideal places (j + 0.5) / n_i of the block,
    merged in order (ties to the earlier source): over any prefix of the block each source is
    within about one sample of its weight's share, so realised proportions track the weights at
    every step, not only at block ends. A pure function of the weights: the global sample ->
    source mapping does not depend on world size, batch split or resume point."""
    index = [np.arange(n, dtype=np.int64) for n in quotas.tolist()]
    # (2j + 1) / (2n) is correctly rounded, so equal places of two sources compare equal (tie ->
    # lower source) and distinct ones (at least 1 / (4 n_a n_b) apart) stay distinct
    place = np.concatenate([(2 * j + 1) / (2.0 * len(j)) for j in index])
    src = np.concatenate([np.full(len(j), i, dtype=np.int64) for i, j in enumerate(index)])
    idx = np.concatenate(index)
    order = np.lexsort((src, place))
    return src[order], idx[order]


def source_names(manifest_paths: list[Path]) -> list[str]:
    """`web` for web.manifest.json; a repeated name gets `#2`, `#3`... so metrics keys stay distinct."""
    names: list[str] = []
    for p in manifest_paths:
        base = p.name.removesuffix(".json").removesuffix(".manifest") or p.stem
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}#{n}"
        names.append(name)
    return names


class WeightedMixture:
    """`data.weights`: one TokenWindows per manifest (a "source"), mixed by a fixed schedule.

    Global sample g -> block b, position r = divmod(g, MIX_BLOCK); the block schedule gives its
    source i and index among source i's samples of the block, so it is source i's sample number
    k = b * quota_i + index, read in that source's own magic-prime order (every window of the
    source once per source epoch). Stateless like TokenWindows: the position is the step, any
    world size reads the same global batch, and counts per source up to any g are O(block) at
    most. Validation: the last documents of the last manifest, as without weights."""

    def __init__(self, manifest_paths: list[Path], weights: list[float], ctx_len: int,
                 val_documents: int = 0, seed: int = 0):
        if len(weights) != len(manifest_paths):
            raise ConfigError(f"data.weights has {len(weights)} entries for {len(manifest_paths)} manifests; "
                              "give one weight per manifest")
        last = len(manifest_paths) - 1
        self.sources = [TokenWindows([p], ctx_len, val_documents if i == last else 0, seed)
                        for i, p in enumerate(manifest_paths)]
        self._check_same_tokenizer(manifest_paths)
        self.names = source_names(manifest_paths)
        self.weights = [float(w) / float(sum(weights)) for w in weights]
        self.quotas = source_quotas(weights)
        for name, w, q in zip(self.names, self.weights, self.quotas.tolist(), strict=True):
            if q == 0:
                raise ConfigError(f"data.weights: {name}'s weight {w:.2e} (normalised) is below "
                                  f"1/{MIX_BLOCK}, the schedule's resolution; raise it or leave the "
                                  "manifest out")
        self.block_source, self.block_index = block_schedule(self.quotas)
        self.ctx_len = ctx_len
        self.tokenizer = self.sources[0].tokenizer
        self.vocab_size = self.sources[0].vocab_size
        self.vocab_limit: int | None = None
        self.n_chunks = sum(s.n_chunks for s in self.sources)
        self.n_val_windows = self.sources[-1].n_val_windows

    def _check_same_tokenizer(self, manifest_paths: list[Path]) -> None:
        first = self.sources[0].tokenizer
        for p, s in zip(manifest_paths[1:], self.sources[1:], strict=True):
            if s.tokenizer.get("identity") != first.get("identity"):
                raise ConfigError(
                    f"data manifest {p}: tokenizer {s.tokenizer.get('spec')!r} (identity "
                    f"{s.tokenizer.get('identity')}) differs from {manifest_paths[0]}'s "
                    f"{first.get('spec')!r} (identity {first.get('identity')}); all manifests of a run must "
                    "use the same tokenizer"
                )

    def limit_vocab(self, vocab_size: int) -> None:
        for s in self.sources:
            s.limit_vocab(vocab_size)
        self.vocab_limit = vocab_size

    # ------------------------------------------------------------------------------------ train
    def source_of(self, g: int) -> tuple[int, int]:
        """(source, that source's sample number) of global sample g."""
        b, r = divmod(g, MIX_BLOCK)
        i = int(self.block_source[r])
        return i, b * int(self.quotas[i]) + int(self.block_index[r])

    def samples_by_source(self, n: int) -> np.ndarray:
        """How many of global samples 0..n-1 each source gave (cheap enough for every step)."""
        b, r = divmod(n, MIX_BLOCK)
        return b * self.quotas + np.bincount(self.block_source[:r], minlength=len(self.sources))

    def tokens_by_source(self, n: int) -> dict[str, int]:
        """Training tokens (ctx_len per sample, as the run's `tokens`) of global samples 0..n-1."""
        counts = self.samples_by_source(n)
        return {name: int(c) * self.ctx_len for name, c in zip(self.names, counts, strict=True)}

    def sample(self, g: int) -> np.ndarray:
        i, k = self.source_of(g)
        return self.sources[i].sample(k)

    def batch(
        self, step: int, micro: int, rank: int, world: int, micro_batch: int, grad_accum: int
    ) -> torch.Tensor:
        """(micro_batch, ctx_len + 1) int64 tokens, the same sample numbering as TokenWindows.batch."""
        base = first_sample(step, micro, rank, world, micro_batch, grad_accum)
        picks = [self.source_of(base + b) for b in range(micro_batch)]
        rows = np.stack([self.sources[i].sample(k) for i, k in picks])
        limit = self.vocab_limit
        if limit is not None and (rows.max() >= limit or rows.min() < 0):
            for row, (i, k) in zip(rows, picks, strict=True):  # name the bad shard (its source's check)
                src = self.sources[i]
                chunk = src.chunk_of(k)
                src._check_ids(row[None], lambda _, s=src, c=chunk: s.locate(c))
        return torch.from_numpy(rows)

    def micro_batches(
        self, rank: int, world: int, micro_batch: int, grad_accum: int
    ) -> Callable[[int], torch.Tensor]:
        return micro_batch_reader(self.batch, rank, world, micro_batch, grad_accum)

    def val_batches(self, rank: int, world: int, micro_batch: int, max_batches: int) -> list[torch.Tensor]:
        return self.sources[-1].val_batches(rank, world, micro_batch, max_batches)

    def describe(self, run_samples: int) -> list[str]:
        """One banner line per source: weight, size, and how often the run reads it."""
        lines = []
        counts = self.samples_by_source(run_samples)
        for name, w, src, n in zip(self.names, self.weights, self.sources, counts, strict=True):
            tokens = sum(sh.train_tokens for sh in src.shards)
            epochs = int(n) / src.prime
            lines.append(f"  {name}: weight {w:.3f}, {tokens:,} tokens ({src.n_chunks:,} windows), "
                         f"{epochs:.2f} epochs over the run" + (" (repeats its data)" if epochs > 1 else ""))
        return lines


def open_windows(manifest_paths: list[Path], ctx_len: int, val_documents: int = 0, seed: int = 0,
                 weights: list[float] | None = None) -> TokenWindows | WeightedMixture:
    """No weights: every manifest in one pool of windows (the original behaviour, bit for bit)."""
    if not weights:
        return TokenWindows(manifest_paths, ctx_len, val_documents, seed)
    return WeightedMixture(manifest_paths, weights, ctx_len, val_documents, seed)
