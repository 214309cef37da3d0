"""Run configuration: a YAML file of sections, `--set section.key=value` overrides, validation.

The YAML holds what a run needs besides DeepSpeed's own file (`ds_config`): the model (a preset
plus field overrides), the data manifests, batch sizes, the optimizer and LR schedule, evaluation,
checkpoint and logging cadence. Unknown keys are errors, so a typo never silently falls back to a
default. The resolved config (after overrides and filled-in defaults) is printed and saved with
the run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A run config that cannot work; the message names the file or key and the problem."""


@dataclass
class ModelSection:
    """Written `model: {preset: 1b5, n_layer: 12, ...}` (or `--set model.n_layer=12`): any
    train.config.ModelConfig field next to the preset. vocab_size "auto" takes the tokenizer's
    vocab_size from the data manifest; ctx_len "auto" (the context length recorded with the
    weights) takes train.ctx_len."""

    preset: str = "tiny"
    # The fields given next to `preset`, collected here by config_from_dict. Not a key of its own
    # in a config file: one spelling per setting (see OVERRIDES_REFUSED).
    overrides: dict[str, Any] = field(default_factory=dict)


OVERRIDES_REFUSED = (
    "model.overrides is not a key: write model fields next to the preset, e.g. "
    "`model: {preset: 1b5, n_layer: 12}` in the YAML or `--set model.n_layer=12`"
)


@dataclass
class DataSection:
    manifests: list[str] = field(default_factory=list)  # data_prep manifest.json paths
    val_documents: int = 32  # held-out documents, taken from the end of the last shard
    seed: int = 0  # varies the window order between runs on the same data
    # one per manifest, normalised: the share of training samples each manifest gives (GPT-NeoX's
    # train_data_weights); empty -> all manifests in one pool of windows, as before weights existed
    weights: list[float] = field(default_factory=list)


@dataclass
class TrainSection:
    ctx_len: int = 256  # tokens in memory at once: the window, or its segment when seq_len is longer
    # tokens per training window (each sample reads seq_len + 1); 0 -> ctx_len. A multiple of ctx_len:
    # the window is trained in seq_len / ctx_len segments, the RWKV state carried across them
    seq_len: int = 0
    bptt: str = "full"  # across segments: full (exact gradient, segments recomputed) | truncated (detached)
    micro_batch_size: int = 4  # per process
    grad_accum: int = 1
    steps: int = 100  # optimizer steps
    precision: str = "bf16"  # bf16 | fp16 | fp32
    zero_stage: int = 2  # 0 | 1 | 2 | 3
    offload_optimizer: bool = False  # ZeRO 2/3: optimizer states and step on the CPU
    grad_clip: float = 1.0  # 0 disables
    global_batch_size: int = 0  # sequences per optimizer step; >0 derives grad_accum from the world size
    l2wrap: bool = True  # RWKV-LM's L2Wrap logit regulariser
    max_nan_skips: int = 3  # non-finite losses skipped before the run stops with an error
    fault_nan_steps: list[int] = field(default_factory=list)  # fault injection: NaN in these steps' forward

    @property
    def window(self) -> int:
        """Tokens per training window (seq_len, or ctx_len when seq_len is 0)."""
        return self.seq_len or self.ctx_len

    @property
    def n_segments(self) -> int:
        return self.window // self.ctx_len


@dataclass
class OptimSection:
    name: str = "adam"  # adam: DeepSpeed FusedAdam / DeepSpeedCPUAdam; torch_adamw: torch.optim.AdamW
    lr_init: float = 6e-4
    lr_final: float = 1e-5
    warmup_tokens: int = 0
    decay: str = "cosine"  # cosine | exponential | constant
    decay_tokens: int = 0  # tokens over which lr goes from lr_init to lr_final; 0 -> the whole run
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float | None = None  # None: the architecture's (RWKV-7 1e-18 as RWKV-LM x070; RWKV-4 1e-8)
    weight_decay: float = 0.0  # applied to 2-D weight matrices only
    layerwise_lr: bool = True  # RWKV-LM multipliers: RWKV-4 time_decay x2, time_first x3; RWKV-7 w0 x2


@dataclass
class EvalSection:
    every: int = 100  # optimizer steps between validation passes; 0 disables
    batches: int = 4  # micro-batches per process per validation pass


@dataclass
class CheckpointSection:
    every: int = 200  # optimizer steps between checkpoints; 0 -> only at the end and on signals
    keep: int = 3  # complete checkpoints kept (older ones deleted)
    universal: str = "auto"  # auto: convert with ds_to_universal when the world size changed | never


@dataclass
class LogSection:
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float = 0.0  # per device, for MFU; 0 -> table by device model (None if unknown), 1.0 on CPU


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    ds_config: str = "ds_config.json"  # relative paths resolve against the config file, then the repo
    seed: int = 1234
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    source: str = field(default="", compare=False)  # the YAML file this came from (not a key)

    def to_dict(self) -> dict[str, Any]:
        """The config as a file would spell it (model fields next to `preset`), so that a saved
        config.resolved.yaml loads back as a run config."""
        d = dataclasses.asdict(self)
        d.pop("source")
        model = d["model"]
        d["model"] = {"preset": model["preset"], **model["overrides"]}
        return d

    def tokens_per_step(self, world_size: int) -> int:
        t = self.train
        return t.micro_batch_size * t.grad_accum * world_size * t.window


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
_SECTION_TYPES = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "optim": OptimSection,
    "eval": EvalSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
}
REPO_ROOT = Path(__file__).resolve().parent.parent


# Keys of earlier releases, with what replaced them.
RETIRED_KEYS = {
    "wkv_chunking": "the WKV kernel has no length bound any more; model.wkv_chunk_len (optional) "
    "bounds its steps per call",
}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    for key in unknown:
        if key in RETIRED_KEYS:
            raise ConfigError(f"{where}.{key} is no longer a setting: {RETIRED_KEYS[key]}")
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default
        if default is dataclasses.MISSING and known[name].default_factory is not dataclasses.MISSING:
            default = known[name].default_factory()
        kwargs[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check a value against its default's type; ints are accepted where floats are expected."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads "6e-4" as a string
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set tree[path] = value."""
    if path[0] == "model" and len(path) >= 2 and path[1] == "overrides":
        raise ConfigError(f"--set {'.'.join(path)}: {OVERRIDES_REFUSED}")
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> RunConfig:
    tree = copy.deepcopy(tree)
    unknown = sorted(set(tree) - set(SECTIONS) - {"source"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; known: {sorted(SECTIONS)}")
    kwargs: dict[str, Any] = {}
    for name, value in tree.items():
        if name == "source":
            continue
        if name in _SECTION_TYPES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping, got {value!r}")
            if name == "model":
                if "overrides" in value:
                    raise ConfigError(f"{source}: {OVERRIDES_REFUSED}")
                value = dict(value)
                value = {"preset": value.pop("preset", ModelSection.preset), "overrides": value}
            kwargs[name] = _build(_SECTION_TYPES[name], value, f"{source}: {name}")
        else:
            kwargs[name] = _coerce(value, getattr(RunConfig, name, ""), f"{source}: {name}")
    cfg = RunConfig(**kwargs, source=source)
    validate(cfg)
    return cfg


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults when path is None) and apply `--set` overrides."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"run config {p}: file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"run config {p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"run config {p}: expected a mapping of sections at the top level")
        tree = loaded or {}
        source = str(p)
    for text in overrides or []:
        key_path, value = parse_override(text)
        apply_override(tree, key_path, value)
    return config_from_dict(tree, source)


def validate(cfg: RunConfig) -> None:
    """Checks that need no data, model or processes; later checks live where the facts are known."""
    t, o, where = cfg.train, cfg.optim, cfg.source
    if t.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"{where}: train.precision must be bf16, fp16 or fp32, got {t.precision!r}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.offload_optimizer and t.zero_stage not in (1, 2, 3):
        raise ConfigError(f"{where}: train.offload_optimizer needs ZeRO stage 1, 2 or 3")
    for name in ("ctx_len", "micro_batch_size", "grad_accum", "steps"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"{where}: train.{name} must be positive, got {getattr(t, name)}")
    if t.seq_len < 0 or t.seq_len % t.ctx_len:
        raise ConfigError(f"{where}: train.seq_len {t.seq_len} must be a multiple of train.ctx_len "
                          f"{t.ctx_len} (or 0: the window is ctx_len)")
    if t.bptt not in ("full", "truncated"):
        raise ConfigError(f"{where}: train.bptt must be full or truncated, got {t.bptt!r}")
    if t.n_segments > 1 and t.bptt == "full" and t.precision == "fp16":
        raise ConfigError(f"{where}: train.bptt full across segments needs bf16 or fp32: fp16's dynamic loss "
                          "scale would have to carry into the state gradients between segments; use "
                          "train.precision bf16 (or train.bptt truncated)")
    if o.name not in ("adam", "torch_adamw"):
        raise ConfigError(f"{where}: optim.name must be adam or torch_adamw, got {o.name!r}")
    if o.decay not in ("cosine", "exponential", "constant"):
        raise ConfigError(f"{where}: optim.decay must be cosine, exponential or constant, got {o.decay!r}")
    if o.lr_init <= 0 or o.lr_final <= 0:
        raise ConfigError(f"{where}: optim.lr_init and optim.lr_final must be positive")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"{where}: optim.betas must be two numbers in [0, 1), got {o.betas}")
    if cfg.checkpoint.universal not in ("auto", "never"):
        raise ConfigError(f"{where}: checkpoint.universal must be auto or never")
    if cfg.checkpoint.keep < 1:
        raise ConfigError(f"{where}: checkpoint.keep must be at least 1")
    if not cfg.data.manifests:
        raise ConfigError(f"{where}: data.manifests is empty; give at least one data_prep manifest.json")
    if cfg.data.val_documents < 0:
        raise ConfigError(f"{where}: data.val_documents must be >= 0")
    _validate_weights(cfg.data, where)


def _validate_weights(data: DataSection, where: str) -> None:
    if not data.weights:
        return
    if len(data.weights) != len(data.manifests):
        raise ConfigError(f"{where}: data.weights has {len(data.weights)} entries for {len(data.manifests)} "
                          "data.manifests; give one weight per manifest (or none)")
    for i, w in enumerate(data.weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"{where}: data.weights[{i}] must be a positive number, got {w!r} "
                              "(leave a manifest out rather than weight it 0)")
    data.weights = [float(w) for w in data.weights]


def resolve_path(path: str, cfg: RunConfig) -> Path:
    """A relative path in the config: as given if it exists, else next to the config file, else the repo."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    if cfg.source and not cfg.source.startswith("<"):
        candidate = Path(cfg.source).parent / p
        if candidate.exists():
            return candidate
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
