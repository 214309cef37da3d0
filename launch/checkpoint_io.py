"""Read trained RWKV weights from wherever training left them.

Two kinds of input are understood:

* a DeepSpeed checkpoint directory (the run's ``checkpoints/`` directory or one
  tag directory inside it), any ZeRO stage.  ZeRO 1-3 keep the fp32 master
  weights partitioned across ``*_optim_states.pt`` files; DeepSpeed's own
  ``zero_to_fp32`` reassembles them.  Stage 0 keeps the whole model in the
  ``module`` dict of ``mp_rank_00_model_states.pt`` (bf16/fp16 in mixed
  precision, with unnamed fp32 masters in the optimizer state beside it).
* a consolidated state dict file (``torch.save(model.state_dict())``), with the
  model config in a JSON file beside it when there is one.

Files are opened memory-mapped so a large checkpoint is paged in tensor by
tensor rather than copied into memory up front.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.checkpoint_marker import MARKER, check_tag
from train.models import arch_of_state_dict, architecture

# Written by our trainer into a tag once every rank has finished saving it.
COMPLETION_MARKER = MARKER
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# Wrappers (DDP, torch.compile, a trainer's container module) prefix parameter names.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")


class CheckpointError(ValueError):
    """A checkpoint or state dict cannot be used; the message names the file and the problem."""


@dataclass
class LoadedWeights:
    """Weights in our model's key layout, plus what is known about the model and run."""

    tensors: dict[str, Any]  # name -> torch.Tensor, or a lazy DeepSpeed tensor (call `.contiguous()`)
    model_config: dict[str, Any] | None  # ModelConfig.to_dict() when recorded
    run_config: dict[str, Any] | None = None  # the resolved run config of a training run
    source: str = ""  # human-readable description of where the weights came from
    notes: list[str] = field(default_factory=list)
    base_dir: Path | None = None  # where relative paths in run_config may be anchored
    memory_mapped: bool = False  # tensors are read-only views of a privately mapped torch.save file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def pop_tensor(self, name: str) -> torch.Tensor:
        """Materialise one tensor and drop the source's reference to it (keeps peak memory low)."""
        return self.tensors.pop(name).contiguous()

    def release(self, t: torch.Tensor) -> None:
        """Drop the resident pages of a memory-mapped source tensor once it has been copied.

        A cast output is new memory; without this the input's pages stay resident too and
        peak RSS reaches input + output. Only done for private file mappings, whose pages
        are re-read from the file if ever touched again.
        """
        if self.memory_mapped:
            release_mapped_pages(t)


def release_mapped_pages(t: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) over the whole pages a tensor's bytes cover (Linux; else nothing)."""
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4 = MADV_DONTNEED


def check_torch_file(path: Path) -> None:
    """Fail clearly on a missing, empty or truncated ``torch.save`` file.

    ``torch.save`` writes a zip archive whose directory sits at the end of the
    file, so any truncation shows up as an unreadable archive.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable torch.save archive (truncated, corrupt, or written in the "
            "legacy non-zip format)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            size = path.stat().st_size
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    raise CheckpointError(f"{path}: truncated (entry {info.filename} runs past end of file)")
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt torch.save archive ({e})") from e


def load_torch_file(path: Path, weights_only: bool) -> Any:
    """torch.load memory-mapped, turning every failure into an error naming the file.

    DeepSpeed model-state files pickle optimizer and config objects, so they need
    ``weights_only=False``: only load checkpoints from sources you trust.
    """
    check_torch_file(path)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... depending on damage
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from e


def strip_wrapper_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
    """Remove a prefix shared by every key (``module.`` etc.) so keys match ``RWKV.state_dict()``."""
    changed = True
    while changed and "emb.weight" not in tensors:
        changed = False
        for prefix in KNOWN_PREFIXES:
            if tensors and all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                changed = True
    return tensors


def check_rwkv_layout(tensors: Mapping[str, Any], origin: str) -> None:
    """Refuse anything that is not an RWKV state dict in our (RWKV-LM's) key layout."""
    required = [
        "emb.weight",
        "blocks.0.ln0.weight",
        "ln_out.weight",
        "head.weight",
        "blocks.0.att.key.weight",
    ]
    missing = [k for k in required if k not in tensors]
    if missing:
        sample = ", ".join(list(tensors)[:5]) or "(no tensors)"
        raise CheckpointError(
            f"{origin}: not an RWKV state dict in the expected layout; "
            f"missing {missing} (keys start: {sample})"
        )


def infer_model_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Recover the architecture and its sizes from tensor shapes when no config was recorded."""
    return architecture(arch_of_state_dict(shapes)).config_from_shapes(shapes)


def find_model_section(run_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``model`` section of a resolved run config (or the config itself when it is a model config)."""
    if not isinstance(run_config, Mapping):
        return None
    model = run_config.get("model")
    if isinstance(model, Mapping):
        return dict(model)
    if "n_layer" in run_config and "n_embd" in run_config:
        return dict(run_config)
    return None


# ---------------------------------------------------------------- DeepSpeed checkpoints


def _tag_step(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def _is_tag_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in MODEL_STATES_FILES)


def _incomplete_reason(tag_dir: Path) -> str | None:
    """Why a tag written with a completion marker is not usable; None when it is complete.
    The trainer's own check (train.checkpoint_marker), so resume and conversion agree."""
    meta, reason = check_tag(tag_dir)
    return None if meta is not None else reason


def _uses_markers(path: Path) -> bool:
    return any((p / COMPLETION_MARKER).is_file() for p in path.iterdir() if p.is_dir())


def resolve_tag_dir(path: Path, tag: str | None = None) -> Path:
    """The tag directory to read: ``--tag``, else the ``latest`` file, else the newest complete tag."""
    if _is_tag_dir(path) and tag is None:
        return path
    if tag is not None:
        tag_dir = path / tag
        if not tag_dir.is_dir():
            available = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_tag_dir(p))
            raise CheckpointError(f"{path}: no checkpoint tag {tag!r} (available: {available or 'none'})")
        if not _is_tag_dir(tag_dir):
            raise CheckpointError(f"{tag_dir}: tag directory holds no {' or '.join(MODEL_STATES_FILES)}")
        return tag_dir
    markers = path.is_dir() and _uses_markers(path)
    latest = path / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        tag_dir = path / name
        if not _is_tag_dir(tag_dir):
            raise CheckpointError(f"{latest}: names tag {name!r}, but {tag_dir} is missing or incomplete")
        reason = _incomplete_reason(tag_dir) if markers else None
        if reason is None:
            return tag_dir
        warnings.warn(f"{tag_dir}: skipped, {reason}; using the newest complete tag", stacklevel=2)
    tags = sorted(
        (p for p in path.iterdir() if p.is_dir() and _is_tag_dir(p)), key=lambda p: _tag_step(p.name)
    )
    if markers:
        tags = [p for p in tags if _incomplete_reason(p) is None]
    if not tags:
        raise CheckpointError(
            f"{path}: unknown layout: not a DeepSpeed checkpoint directory (no 'latest' file, no tag "
            f"directories with {MODEL_STATES_FILES[0]}) and not a state dict file"
        )
    return tags[-1]


def _zero_optim_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("*_optim_states.pt"))


def load_deepspeed_checkpoint(path: Path, tag: str | None = None) -> LoadedWeights:
    """Consolidated fp32 weights of a DeepSpeed checkpoint (any ZeRO stage)."""
    tag_dir = resolve_tag_dir(path, tag)
    model_file = next(tag_dir / f for f in MODEL_STATES_FILES if (tag_dir / f).is_file())
    optim_files = _zero_optim_files(tag_dir)
    for f in [model_file, *optim_files]:
        check_torch_file(f)
    states = load_torch_file(model_file, weights_only=False)
    if not isinstance(states, Mapping) or "module" not in states:
        raise CheckpointError(f"{model_file}: not a DeepSpeed model states file (no 'module' entry)")
    run_config = states.get("config") if isinstance(states.get("config"), Mapping) else None
    # the trainer records the resolved ModelConfig separately ("auto" values filled in)
    model_config = find_model_section(states.get("model_config")) or find_model_section(run_config)
    notes: list[str] = []
    tensors: dict[str, Any] | None = None
    if optim_files:
        tensors = _load_zero_fp32(tag_dir, optim_files, notes)
    if tensors is None:
        module = states["module"]
        if module is None or not len(module):
            raise CheckpointError(f"{model_file}: empty 'module' and no usable ZeRO optimizer partitions")
        tensors = dict(module)
        source = f"DeepSpeed checkpoint {tag_dir} (module weights)"
        low = sorted({str(t.dtype) for t in tensors.values() if t.dtype != torch.float32})
        masters = (
            _stage0_fp32_masters(tensors, states.get("optimizer"), model_config, run_config) if low else None
        )
        if masters is not None:
            tensors, low = masters, []
            source = f"DeepSpeed checkpoint {tag_dir} (fp32 master weights of the mixed-precision optimizer)"
        if low:
            notes.append(f"weights read from the {'/'.join(low)} module copy (no fp32 master weights found)")
    else:
        source = f"DeepSpeed ZeRO checkpoint {tag_dir} (fp32 master weights via zero_to_fp32)"
    del states
    tensors = strip_wrapper_prefix(tensors)
    check_rwkv_layout(tensors, str(tag_dir))
    mapped = "(module weights)" in source
    return LoadedWeights(
        tensors, model_config, dict(run_config or {}), source, notes, base_dir=tag_dir, memory_mapped=mapped
    )


def _trainer_group_names(
    model_config: Mapping[str, Any] | None, run_config: Mapping[str, Any] | None
) -> list[list[str]] | None:
    """Parameter names per optimizer group, in the order the trainer built them (train.optim)."""
    if not model_config or not isinstance(run_config, Mapping):
        return None
    try:
        from train.config import ModelConfig
        from train.model import RWKV
        from train.optim import param_groups

        fields = {k: v for k, v in model_config.items() if k in ModelConfig.__dataclass_fields__}
        with torch.device("meta"):
            model = RWKV(ModelConfig.from_dict(fields))
        optim = run_config.get("optim") or {}
        groups = param_groups(
            model, float(optim.get("weight_decay", 0.0)), bool(optim.get("layerwise_lr", False))
        )
    except Exception:  # another trainer's checkpoint, or a config this version cannot rebuild
        return None
    names_of = {id(p): n for n, p in model.named_parameters()}
    return [[names_of[id(p)] for p in g["params"]] for g in groups]


def _stage0_fp32_masters(
    module: dict[str, Any],
    optimizer: Any,
    model_config: Mapping[str, Any] | None,
    run_config: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """Name the fp32 master copies a stage-0 bf16/fp16 optimizer saves (``fp32_groups``).

    They are saved as per-group lists of tensors without names, in the optimizer's parameter
    order. That order is rebuilt with the trainer's own grouping, and accepted only if every
    master has its parameter's shape and rounds exactly to the saved bf16/fp16 module weight
    (the optimizer writes the module weights that way after every step). Otherwise None: the
    low-precision module weights are used.
    """
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, Mapping) else None
    if not isinstance(groups, list) or not all(isinstance(g, list | tuple) for g in groups):
        return None
    names = _trainer_group_names(model_config, run_config)
    if names is None or [len(n) for n in names] != [len(g) for g in groups]:
        return None
    out: dict[str, Any] = {}
    for group_names, group in zip(names, groups, strict=True):
        for name, master in zip(group_names, group, strict=True):
            low = module.get(name)
            if low is None or master.shape != low.shape or not torch.equal(master.to(low.dtype), low):
                return None
            out[name] = master
    return out if len(out) == len(module) else None


def _load_zero_fp32(tag_dir: Path, optim_files: list[Path], notes: list[str]) -> dict[str, Any] | None:
    """fp32 master weights from ZeRO partitions; None when the files hold no ZeRO partitions."""
    # Reading partitions is host work: without this, DeepSpeed probes for an accelerator on import and
    # logs its choice on stdout, ahead of the caller's output (generated text).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        # lazy_mode keeps partitions memory-mapped; tensors are gathered one at a time on `.contiguous()`
        # zero_to_fp32 reports progress on stdout; keep stdout for the caller's output (generated text)
        with contextlib.redirect_stdout(sys.stderr):
            return dict(
                get_fp32_state_dict_from_zero_checkpoint(
                    str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True
                )
            )
    except ValueError as e:
        if "is not a zero checkpoint" in str(e):
            # bf16 without ZeRO keeps its fp32 copy in a layout zero_to_fp32 does not read
            notes.append(f"{optim_files[0].name} holds no ZeRO partitions; falling back to module weights")
            return None
        raise CheckpointError(f"{tag_dir}: cannot consolidate ZeRO partitions ({e})") from e
    except (FileNotFoundError, RuntimeError, KeyError, EOFError) as e:
        raise CheckpointError(
            f"{tag_dir}: cannot consolidate ZeRO partitions ({type(e).__name__}: {e})"
        ) from e


# ---------------------------------------------------------------- plain state dict files


def sidecar_config_paths(path: Path) -> list[Path]:
    """Where a model config may sit beside a state dict: ``NAME.json`` then ``config.json``."""
    return [path.with_suffix(".json"), path.parent / "config.json"]


def load_state_dict_file(path: Path, model_config_path: Path | None = None) -> LoadedWeights:
    """A consolidated state dict (``torch.save(model.state_dict())``), or an RWKV .pth."""
    if model_config_path is not None and not model_config_path.is_file():
        # a config named on the command line and missing must not fall back to guessing from shapes
        raise CheckpointError(f"{model_config_path}: model config file not found (--model-config)")
    try:
        obj = load_torch_file(path, weights_only=True)
    except CheckpointError as e:
        if "Weights only load failed" not in str(e):
            raise
        obj = load_torch_file(path, weights_only=False)  # a DeepSpeed model-states file given directly
    run_config = None
    if isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):  # a stage-0 model states file
        run_config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
        obj = obj["module"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: unknown layout: expected a dict of tensors (a model state_dict)")
    tensors = strip_wrapper_prefix(dict(obj))
    check_rwkv_layout(tensors, str(path))
    model_config = find_model_section(run_config)
    candidates = [model_config_path] if model_config_path else sidecar_config_paths(path)
    for cand in candidates:
        if model_config is None and cand is not None and cand.is_file():
            try:
                side = json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cand}: invalid JSON ({e})") from e
            model_config = find_model_section(side)
            run_config = run_config or side
            if model_config is None and model_config_path is not None:
                raise CheckpointError(
                    f"{cand}: no model config (expected a 'model' section or n_layer/n_embd)"
                )
    return LoadedWeights(
        tensors,
        model_config,
        dict(run_config or {}),
        f"state dict {path}",
        base_dir=path.parent,
        memory_mapped=True,
    )


def load_weights(
    path: str | Path, tag: str | None = None, model_config_path: str | Path | None = None
) -> LoadedWeights:
    """Load weights from a DeepSpeed checkpoint directory or a state dict file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        loaded = load_deepspeed_checkpoint(path, tag)
    else:
        if tag is not None:
            raise CheckpointError(f"{path}: --tag applies to a DeepSpeed checkpoint directory, not a file")
        loaded = load_state_dict_file(path, Path(model_config_path) if model_config_path else None)
    inferred = infer_model_config(loaded.shapes())
    if loaded.model_config is None:
        loaded.notes.append("no model config recorded; architecture inferred from tensor shapes")
    # Sizes as recorded where recorded, so that a dropped layer or a wrong shape shows up in the
    # tensor-by-tensor check (launch.model_loading) instead of shrinking the model; else from the tensors.
    recorded = {k: v for k, v in (loaded.model_config or {}).items() if v not in ("auto", 0, None)}
    loaded.model_config = {**inferred, **recorded}
    for note in loaded.notes:
        warnings.warn(note, stacklevel=2)
    return loaded


def _resolve_spec(spec: str, bases: list[Path]) -> str:
    """A tokenizer file spec made absolute when it exists relative to one of `bases`; names kept."""
    if Path(spec).exists():
        return str(Path(spec).resolve())
    for base in bases:
        if (base / spec).exists():
            return str((base / spec).resolve())
    return spec  # a built-in name such as rwkv-world, or a path the user must fix


def find_tokenizer_spec(run_config: Mapping[str, Any] | None, base_dir: Path | None = None) -> str | None:
    """The tokenizer a run used: named in its config, or in the token manifest(s) it trained on.

    Relative paths are tried from the working directory, then from `base_dir` and its parents
    (a run's config names files relative to where training was started).
    """
    if not isinstance(run_config, Mapping):
        return None
    bases = [Path.cwd()] + ([base_dir, *base_dir.resolve().parents] if base_dir else [])
    stack: list[Any] = [run_config]
    manifests: list[str] = []
    while stack:
        d = stack.pop()
        items = d.items() if isinstance(d, Mapping) else enumerate(d)
        for key, value in items:
            if key == "tokenizer" and isinstance(value, str):
                return _resolve_spec(value, bases)
            if key == "tokenizer" and isinstance(value, Mapping) and isinstance(value.get("spec"), str):
                return _resolve_spec(value["spec"], bases)
            if isinstance(value, Mapping | list | tuple):
                stack.append(value)
            elif isinstance(value, str) and value.endswith(".manifest.json"):
                manifests.append(value)
    for m in manifests:
        found = next((b / m for b in bases if (b / m).is_file()), None)
        if found is None:
            continue
        try:
            spec = json.loads(found.read_text()).get("tokenizer", {}).get("spec")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(spec, str):
            return _resolve_spec(spec, [found.parent, *bases])
    return None
