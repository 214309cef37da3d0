"""The training loop: RWKV under a DeepSpeed engine, from a resolved run config to checkpoints.

Order of work: check everything that can be checked without processes (config, data, model sizes,
DeepSpeed config); join the process group; find the checkpoint to resume from (converting it to a
universal checkpoint if the world size changed); build the engine; train with validation,
metrics, signal-triggered and periodic checkpoints.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train import checkpointing, distributed, ext_build, to_universal, val_positions
from train.config import ModelConfig
from train.data import TokenWindows, WeightedMixture, open_windows
from train.ds_config import adam_eps, fill_ds_config, load_ds_config
from train.loss import lm_loss
from train.metrics import MetricsWriter, mfu, peak_tflops, truncate_metrics
from train.models import ARCH_TITLES, architecture
from train.nonfinite import GradientGate, optimizer_update_skipped
from train.optim import apply_lr, param_groups, torch_adamw
from train.prefetch import BatchPrefetcher
from train.run_config import ConfigError, RunConfig, dump_yaml, resolve_path
from train.schedule import lr_at
from train.segments import engine_forward, train_window
from train.val_positions import PositionLoss


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the last good checkpoint is kept."""


@dataclass
class Plan:
    """Everything resolved before any process group exists."""

    cfg: RunConfig
    model_cfg: ModelConfig
    data: TokenWindows | WeightedMixture
    ds: dict[str, Any]
    world_size: int


def resolve_model_config(cfg: RunConfig, tokenizer_vocab: int) -> ModelConfig:
    overrides = dict(cfg.model.overrides)
    if overrides.get("vocab_size", "auto") == "auto":
        overrides["vocab_size"] = tokenizer_vocab
    if overrides.get("ctx_len", "auto") == "auto":
        overrides["ctx_len"] = cfg.train.window  # the context the model is trained at
    try:
        mc = ModelConfig.from_preset(cfg.model.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cfg.source}: model: {e}") from None
    if tokenizer_vocab > mc.vocab_size:
        raise ConfigError(
            f"{cfg.source}: the data's tokenizer has {tokenizer_vocab} tokens but the model's vocab_size "
            f"is {mc.vocab_size}; token ids would index past the embedding (set model.vocab_size to "
            f"at least {tokenizer_vocab}, or auto)"
        )
    return mc


def resolve_batch(cfg: RunConfig, world_size: int) -> None:
    """Derive grad_accum from global_batch_size when given; refuse batches the world cannot split."""
    t = cfg.train
    if t.global_batch_size <= 0:
        return
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"{cfg.source}: train.global_batch_size {t.global_batch_size} is not divisible by "
            f"micro_batch_size {t.micro_batch_size} x world size {world_size} = {per_step}"
        )
    gas = t.global_batch_size // per_step
    if t.grad_accum not in (1, gas):
        raise ConfigError(
            f"{cfg.source}: train.grad_accum {t.grad_accum} contradicts global_batch_size "
            f"{t.global_batch_size} at world size {world_size} (which needs grad_accum {gas})"
        )
    t.grad_accum = gas


def plan(cfg: RunConfig, world_size: int) -> Plan:
    """All checks that need neither processes nor a model instance."""
    resolve_batch(cfg, world_size)
    manifests = [resolve_path(m, cfg) for m in cfg.data.manifests]
    data = open_windows(manifests, cfg.train.window, cfg.data.val_documents, cfg.data.seed, cfg.data.weights)
    model_cfg = resolve_model_config(cfg, data.vocab_size)
    if cfg.train.n_segments > 1 and not hasattr(architecture(model_cfg.arch).Model, "forward_with_state"):
        raise ConfigError(f"{cfg.source}: train.seq_len {cfg.train.seq_len} > train.ctx_len needs a model "
                          f"that carries its state across segments; {model_cfg.arch} has no "
                          "forward_with_state")
    data.limit_vocab(model_cfg.vocab_size)  # token ids past the embedding: refused, not an IndexError
    cfg.model.overrides = {
        k: v for k, v in model_cfg.to_dict().items() if k != "preset"
    }  # record the resolved sizes, not "auto"
    ds_path = resolve_path(cfg.ds_config, cfg)
    ds = fill_ds_config(load_ds_config(ds_path), cfg, world_size, origin=str(ds_path))
    return Plan(cfg, model_cfg, data, ds, world_size)


class _StopRequest:
    """SIGTERM / SIGUSR1 (e.g. SLURM preemption): checkpoint at the next step boundary, then exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum = 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum


def _all_reduce_sum(values: torch.Tensor) -> list[float]:
    """Sum a float64 vector over ranks and read it on the host.

    The tensor must live on the rank's device: NCCL refuses host tensors (the run would die at the
    first step); NCCL and gloo both reduce float64. The `.tolist()` is the caller's host sync."""
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.tolist()


def _grad_norm(engine: Any) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if torch.is_tensor(g) else g)


@dataclass
class Progress:
    """Where the run stands between optimizer steps."""

    step: int = 0  # optimizer steps done, skipped ones included (the data position)
    tokens: int = 0  # tokens read, skipped steps included (the LR schedule follows the data)
    nan_skips: int = 0
    last_good: bool = True  # the last step was not skipped


@dataclass
class StepResult:
    loss: float | None  # mean over ranks and micro-batches; None when skipped
    skipped: bool
    n_bad: int  # non-finite micro-batches over all ranks
    signum: int  # a stop signal some rank received, else 0
    grad_norm: float | None


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.denv = distributed.setup_environment()
        self.rank, self.world = self.denv.rank, self.denv.world_size
        self.plan = plan(cfg, self.world)  # raises ConfigError before any process group starts
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # DeepSpeed's accelerator, not torch.cuda.is_available(): DS_ACCELERATOR=cpu must win on a GPU host.
        # One rule for the rank's GPU (local rank modulo the visible devices) for the process group, the
        # engine and the batches, which also holds under SLURM's --gpus-per-task=1.
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        self.device = distributed.rank_device(self.denv.local_rank)
        ext_build.arch_list_for_deepspeed(log=self.log)
        t = cfg.train
        # Batches of the next micro-steps are read (and pinned, on CUDA) while this one computes.
        self.batches = BatchPrefetcher(
            self.plan.data.micro_batches(self.rank, self.world, t.micro_batch_size, t.grad_accum), self.device
        )
        if cfg.train.precision == "fp16" and not accel.is_fp16_supported():
            raise ConfigError(
                f"{cfg.source}: train.precision fp16 is not supported on {accel.device_name()} "
                "(DeepSpeed's accelerator); use bf16 or fp32"
            )

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[train] {msg}", flush=True)

    # ------------------------------------------------------------------------------- setup
    def _find_resume(self) -> tuple[checkpointing.Candidate | None, bool]:
        found: list[Any] = [None]
        if self.rank == 0:
            cand = checkpointing.find_resume_point(self.ckpt_dir, log=self.log)
            if cand is not None and int(cand.meta["world_size"]) != self.world:
                # Before the broadcast, so no rank can read a failure left by an earlier attempt.
                to_universal.clear_failure(cand.path)
            found[0] = cand
        dist.broadcast_object_list(found, src=0)
        cand = found[0]
        if cand is None:
            if self.rank == 0 and self.ckpt_dir.is_dir():
                # Starting over: leftovers of an attempt that never completed a checkpoint go.
                checkpointing.discard_newer(self.ckpt_dir, 0, log=self.log)
                truncate_metrics(self.run_dir / "metrics.jsonl", 0)
            dist.barrier()
            return None, False
        universal = int(cand.meta["world_size"]) != self.world
        if universal and self.cfg.checkpoint.universal == "never":
            raise ConfigError(
                f"checkpoint {cand.path} was saved by {cand.meta['world_size']} processes, this run has "
                f"{self.world}; set checkpoint.universal: auto to convert it with ds_to_universal"
            )
        if self.rank == 0:
            checkpointing.discard_newer(self.ckpt_dir, cand.step, log=self.log)
            dropped = truncate_metrics(self.run_dir / "metrics.jsonl", cand.step)
            if dropped:
                self.log(f"metrics.jsonl: dropped {dropped} records after step {cand.step} (trained again)")
        if universal:
            self._convert_universal(cand.path)
        dist.barrier()
        return cand, universal

    def _convert_universal(self, src: Path) -> None:
        """Rank 0 converts; the others wait on its marker file, not in a collective, so the
        conversion may outlast the collective timeout (a 14B conversion takes far longer)."""
        try:
            if self.rank == 0:
                to_universal.convert(src, log=self.log)
            else:
                to_universal.wait_for(src, self.rank)
        except to_universal.UniversalError as e:
            raise TrainingError(str(e)) from None

    def _build_engine(self, universal: bool) -> None:
        import deepspeed

        from train.model import RWKV

        cfg, p = self.cfg, self.plan
        ds = dict(p.ds)
        if universal:
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        # Built on the rank's own device: a 14B model in fp32 is 56 GB, too much to build on the
        # host once per GPU process. Under ZeRO-3 each parameter is also partitioned as soon as its
        # module exists (zero.Init), so no rank ever holds the whole model.
        with self._model_construction(ds), torch.device(self.device):
            model = RWKV(p.model_cfg)
        self.n_params = sum(getattr(x, "ds_numel", x.numel()) for x in model.parameters())
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layerwise_lr)
        if cfg.optim.name == "torch_adamw":
            opt = torch_adamw(groups, cfg.optim.lr_init, cfg.optim.betas, adam_eps(cfg))
            engine, optimizer, _, _ = deepspeed.initialize(
                args=distributed.deepspeed_args(self.device), model=model, optimizer=opt, config=ds
            )
        else:
            engine, optimizer, _, _ = deepspeed.initialize(
                args=distributed.deepspeed_args(self.device), model=model, model_parameters=groups, config=ds
            )
        self.engine, self.optimizer = engine, optimizer

    def _model_construction(self, ds: dict[str, Any]) -> Any:
        """deepspeed.zero.Init at ZeRO-3 (parameters in the config's precision, partitioned at
        creation; RWKV.init_weights gathers them one at a time), else nothing."""
        import contextlib

        import deepspeed

        if self.cfg.train.zero_stage != 3:
            return contextlib.nullcontext()
        return deepspeed.zero.Init(config_dict_or_path=ds)

    def _resume(self, cand: checkpointing.Candidate, universal: bool) -> tuple[int, int]:
        tag = cand.path.name + ("_universal" if universal else "")
        load_path, client = self.engine.load_checkpoint(
            str(self.ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None or client is None:
            raise TrainingError(f"checkpoint {self.ckpt_dir / tag}: DeepSpeed could not load it")
        saved_model = client.get("model_config")
        if saved_model is not None:
            diff = self.plan.model_cfg.shape_changes(saved_model)
            if diff:
                raise ConfigError(
                    f"checkpoint {cand.path}: model differs from the run config (saved, now): {diff}"
                )
        step, tokens = int(client["step"]), int(client["tokens"])
        if not universal:
            checkpointing.load_rng(cand.path, self.rank)
        else:
            torch.manual_seed(self.cfg.seed + 1000003 * step + self.rank)
        self.log(f"resumed from {cand.path} at step {step} ({tokens} tokens seen)"
                 + (" through a universal checkpoint" if universal else ""))
        return step, tokens

    def _banner(self) -> None:
        cfg, p, t = self.cfg, self.plan, self.cfg.train
        tps = cfg.tokens_per_step(self.world)
        self.log(
            "\n".join(
                [
                    "=" * 72,
                    f"{ARCH_TITLES[p.model_cfg.arch]} {p.model_cfg.n_layer} layers x {p.model_cfg.n_embd}, "
                    f"{self.n_params:,} parameters, vocab {p.model_cfg.vocab_size}",
                    f"world size {self.world} ({self.denv.launcher}), ZeRO stage {t.zero_stage}"
                    + (" + optimizer offload" if t.offload_optimizer else "")
                    + f", precision {t.precision}, optimizer {cfg.optim.name}",
                    f"tokens/step {tps:,} = micro {t.micro_batch_size} x grad_accum {t.grad_accum} x "
                    f"world {self.world} x window {t.window}; {t.steps} steps = {tps * t.steps:,} tokens",
                    *([f"window {t.window} = {t.n_segments} segments of ctx_len {t.ctx_len}, the state "
                       f"carried across them, bptt {t.bptt}"] if t.n_segments > 1 else []),
                    *self._data_banner(tps * t.steps // t.window),
                    "=" * 72,
                ]
            )
        )

    def _data_banner(self, run_samples: int) -> list[str]:
        data = self.plan.data
        if isinstance(data, WeightedMixture):
            return [f"data: mixture of {len(data.sources)} manifests, {data.n_chunks:,} windows, "
                    f"{data.n_val_windows} validation windows (last manifest); run_dir {self.run_dir}",
                    *data.describe(run_samples)]
        return [f"data: {data.n_chunks:,} windows (magic prime {data.prime}), "
                f"{data.n_val_windows} validation windows; run_dir {self.run_dir}"]

    def _by_source(self, p: Progress) -> dict[str, Any]:
        """Cumulative training tokens per manifest, from the schedule (no counters to save)."""
        data = self.plan.data
        if not isinstance(data, WeightedMixture):
            return {}
        return {"tokens_by_source": data.tokens_by_source(p.tokens // self.cfg.train.window)}

    # ------------------------------------------------------------------------------- run setup
    def _setup_run(self) -> Progress:
        """Process group, resolved config on disk, engine (resumed when a checkpoint exists),
        the non-finite gradient gate and the schedule's constants."""
        cfg, t, o = self.cfg, self.cfg.train, self.cfg.optim
        distributed.init_process_group(self.denv)
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            text = dump_yaml(cfg)
            (self.run_dir / "config.resolved.yaml").write_text(text)
            print("[train] resolved config:\n" + text, flush=True)
        cand, universal = self._find_resume()
        self._build_engine(universal)
        step, tokens = self._resume(cand, universal) if cand else (0, 0)
        self._banner()

        self.stop = _StopRequest()
        self.gate = GradientGate(self.engine.module.parameters(), self.device)
        self._fault_now = False
        if t.fault_nan_steps:
            self._install_fault_hook()
        self.tokens_per_step = cfg.tokens_per_step(self.world)
        self.decay_tokens = o.decay_tokens or max(1, t.steps * self.tokens_per_step - o.warmup_tokens)
        self.flops_per_token = self.plan.model_cfg.flops_per_token(t.ctx_len)
        self.forward_with_state = engine_forward(self.engine, self.engine.module)
        self.peak = peak_tflops(cfg.log.peak_tflops, self.device, t.precision)
        if self.peak is None:
            name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
            self.log(f"MFU is not reported: no peak TFLOP/s known for {name!r} at {t.precision}; "
                     "set log.peak_tflops to the device's dense peak")
        return Progress(step=step, tokens=tokens)

    def _install_fault_hook(self) -> None:
        """train.fault_nan_steps: rank 0's embedding output becomes NaN in the first micro-batch of
        those steps, so the NaN runs through the whole forward and backward pass like a real one."""

        def poison(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return output * float("nan") if self._fault_now else output

        self.engine.module.get_submodule("emb").register_forward_hook(poison)

    def _lr_at(self, tokens: int) -> float:
        o = self.cfg.optim
        return lr_at(tokens, o.lr_init, o.lr_final, o.warmup_tokens, self.decay_tokens, o.decay)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # From pinned memory the copy is asynchronous: the host does not wait for the GPU here.
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    # ------------------------------------------------------------------------------- one step
    def _train_step(self, step: int, lr: float) -> StepResult:
        """The micro-batches of optimizer step `step` (0-based), then the engine's update.

        Nothing is read back to the host per micro-batch: losses and non-finite flags accumulate on
        the device, and one all-reduce of [loss sum, non-finite micro-batches, signals], right
        before the accumulation boundary's engine.step(), decides whether the update is skipped.
        A non-finite micro-batch on any rank skips the whole step (see train/nonfinite.py): its
        gradient is gated to zero, and the optimizer leaves weights and state untouched."""
        t, engine = self.cfg.train, self.engine
        apply_lr(engine.optimizer, lr)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_bad = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(t.grad_accum):
            batch = self.batches.get(step * t.grad_accum + micro)
            self._fault_now = self.rank == 0 and micro == 0 and (step + 1) in t.fault_nan_steps
            if t.n_segments == 1:
                logits = engine(batch[:, :-1])
                self._fault_now = False
                loss, ce = lm_loss(logits, batch[:, 1:], t.l2wrap)
                finite = self.gate.set(ce)
                loss_sum += torch.where(finite, ce.detach().double(), 0.0)
                n_bad += (~finite).double()
                engine.backward(loss)
                if micro < t.grad_accum - 1:
                    engine.step()  # inside the accumulation window: DeepSpeed only counts the micro-step
                continue
            ce_window, window_bad = self._train_window(batch, last=micro == t.grad_accum - 1)
            self._fault_now = False
            loss_sum += torch.where(window_bad > 0, 0.0, ce_window)
            n_bad += (window_bad > 0).double()
        signals = torch.tensor([float(self.stop.signum == s) for s in _StopRequest.SIGNALS],
                               dtype=torch.float64, device=self.device)
        total, bad, *signalled = _all_reduce_sum(torch.cat([torch.stack([loss_sum, n_bad]), signals]))
        signum = next((s for s, n in zip(_StopRequest.SIGNALS, signalled, strict=True) if n > 0), 0)
        if bad > 0:
            apply_lr(engine.optimizer, 0.0)
            with optimizer_update_skipped(engine.optimizer):
                engine.step()
            return StepResult(None, True, int(bad), int(signum), None)
        engine.step()
        return StepResult(total / (self.world * t.grad_accum), False, 0, int(signum), _grad_norm(engine))

    def _train_window(self, batch: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One window in segments, each a DeepSpeed micro-step (train/segments.py); returns (mean loss
        over the window, non-finite segments) as device tensors. last: the step's final window, whose
        final micro-step the caller's engine.step() completes."""
        t, engine = self.cfg.train, self.engine
        n_bad = torch.zeros((), dtype=torch.float64, device=self.device)
        calls = [0]

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss, ce = lm_loss(logits, targets, t.l2wrap)
            # With full BPTT a bad segment's state gradient taints the earlier ones: the gate stays shut.
            finite = torch.isfinite(ce.detach()) & (n_bad == 0)
            self.gate.ok = finite
            n_bad.add_((~finite).double())
            return loss, ce

        def backward(objective: torch.Tensor) -> None:
            engine.backward(objective)
            calls[0] += 1
            if not (last and calls[0] == t.n_segments):
                engine.step()  # inside the accumulation window: DeepSpeed only counts the micro-step

        losses = train_window(self.forward_with_state, batch[:, :-1], batch[:, 1:], t.ctx_len, t.bptt,
                              loss_fn, backward, grad_scale=1.0 / engine.gradient_accumulation_steps())
        return torch.stack(losses).double().mean(), n_bad

    # ------------------------------------------------------------------------------- bookkeeping
    def _on_skipped_step(self, p: Progress, result: StepResult, metrics: MetricsWriter) -> None:
        t = self.cfg.train
        p.nan_skips += 1
        p.last_good = False
        metrics.write({"step": p.step, "skipped_nonfinite": result.n_bad, "tokens": p.tokens,
                       **self._by_source(p)})
        self.log(f"WARNING: non-finite loss at step {p.step} (non-finite micro-batches over all ranks: "
                 f"{result.n_bad}); step skipped, weights and optimizer state unchanged (skip {p.nan_skips}; "
                 f"train.max_nan_skips = {t.max_nan_skips})")
        if p.nan_skips > t.max_nan_skips:
            raise TrainingError(
                f"non-finite loss {p.nan_skips} times (train.max_nan_skips = {t.max_nan_skips}); "
                f"stopping at step {p.step}. The last good checkpoint in {self.ckpt_dir} is kept; "
                "lower optim.lr_init or check the data"
            )

    def _log_step(self, p: Progress, result: StepResult, lr: float, seconds: float, metrics: MetricsWriter,
                  bar: Any) -> None:
        tps = self.tokens_per_step / seconds
        record: dict[str, Any] = {
            "step": p.step,
            "loss": result.loss,
            "lr": lr,
            "tokens": p.tokens,
            "tokens_per_s": tps,
            "grad_norm": result.grad_norm,
            "mfu": mfu(tps, self.flops_per_token, self.world, self.peak),
            **self._by_source(p),
        }
        if self.device.type == "cuda":
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        metrics.write(record)
        if bar is not None:
            bar.update(1)
            util = "n/a" if record["mfu"] is None else f"{record['mfu']:.2%}"
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:,.0f}", mfu=util)

    def validate(self) -> tuple[float, list[float]] | None:
        """(mean validation loss, mean loss per position in the window) over every rank's held-out
        windows (one all-reduce, one host read). A window longer than ctx_len runs in segments, the
        state carried across them."""
        cfg, t = self.cfg, self.cfg.train
        if cfg.eval.batches <= 0 or self.plan.data.n_val_windows < self.world:
            return None
        batches = self.plan.data.val_batches(self.rank, self.world, t.micro_batch_size, cfg.eval.batches)
        self.engine.eval()
        window = batches[0].shape[1] - 1 if batches else t.window
        positions = PositionLoss(window, self.device)
        with torch.no_grad():
            for b in batches:
                b = self._to_device(b)
                state = None
                for t0 in range(0, window, t.ctx_len):
                    idx, targets = b[:, :-1][:, t0 : t0 + t.ctx_len], b[:, 1:][:, t0 : t0 + t.ctx_len]
                    if t.n_segments == 1:
                        logits = self.engine(idx)
                    else:
                        logits, state = self.forward_with_state(idx, state)
                    token_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1), reduction="none")
                    positions.add(t0, token_loss.view(targets.shape))
        self.engine.train()
        return positions.result(_all_reduce_sum)

    def _maybe_validate(self, p: Progress, metrics: MetricsWriter, final: bool = False) -> None:
        every = self.cfg.eval.every
        if not final and not (every and p.step % every == 0 and p.step < self.cfg.train.steps):
            return
        result = self.validate()
        if result is None:
            return
        val, per_pos = result
        by_pos = val_positions.buckets(per_pos)
        metrics.write({"step": p.step, "val_loss": val, "tokens": p.tokens, "val_loss_by_position": by_pos})
        where = ", ".join(f"{k} {v:.4f}" for k, v in by_pos.items())
        self.log((f"final val_loss {val:.4f}" if final else f"step {p.step}: val_loss {val:.4f}")
                 + f" (by position: {where})")
        if self.rank == 0:
            val_positions.plot(self.run_dir, per_pos, p.step, self.log)

    def save(self, step: int, tokens: int) -> None:
        client = {
            "step": step,
            "tokens": tokens,
            "samples": step * self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * self.world,
            "world_size": self.world,
            "config": self.cfg.to_dict(),
            "model_config": self.plan.model_cfg.to_dict(),
        }
        path = checkpointing.save(
            self.engine, self.ckpt_dir, step, client, self.cfg.checkpoint.keep, self.rank, self.world
        )
        self.log(f"saved checkpoint {path}")

    def _maybe_checkpoint(self, p: Progress) -> None:
        every = self.cfg.checkpoint.every
        # Not right after a skipped step, so the newest checkpoint is always one after a good step.
        if every and p.step % every == 0 and p.step < self.cfg.train.steps and p.last_good:
            self.save(p.step, p.tokens)

    def _finish(self, p: Progress, metrics: MetricsWriter) -> None:
        self._maybe_validate(p, metrics, final=True)
        final_tag = self.ckpt_dir / checkpointing.tag_for(p.step)
        if p.last_good and not (final_tag / checkpointing.MARKER).exists():
            self.save(p.step, p.tokens)
        self.log(f"done: {p.step} steps, {p.tokens:,} tokens")

    # ------------------------------------------------------------------------------- the loop
    def train(self) -> None:
        t = self.cfg.train
        p = self._setup_run()
        metrics = MetricsWriter(self.run_dir, self.rank == 0, self.cfg.log.tensorboard)
        bar = None
        if self.rank == 0 and self.cfg.log.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True)
        try:
            while p.step < t.steps:
                t0 = time.perf_counter()
                lr = self._lr_at(p.tokens + self.tokens_per_step)
                result = self._train_step(p.step, lr)
                p.step += 1
                p.tokens += self.tokens_per_step  # read even when skipped: the schedule follows the data
                if result.skipped:
                    self._on_skipped_step(p, result, metrics)
                else:
                    p.last_good = True
                    self._log_step(p, result, lr, time.perf_counter() - t0, metrics, bar)
                    self._maybe_validate(p, metrics)
                if result.signum:
                    # Also right after a skipped step: its weights and optimizer state are the last
                    # good step's, and the data position moves on.
                    self.log(f"signal {result.signum}: saving a checkpoint at step {p.step}, then exiting")
                    self.save(p.step, p.tokens)
                    return
                self._maybe_checkpoint(p)
            self._finish(p, metrics)
        finally:
            self.batches.close()
            if bar is not None:
                bar.close()
            metrics.close()


def run(cfg: RunConfig) -> int:
    trainer = Trainer(cfg)
    try:
        trainer.train()
    except (ConfigError, TrainingError) as e:
        print(f"[train] error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
