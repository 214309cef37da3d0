"""The training loop: RWKV under a DeepSpeed engine, from a resolved run config to checkpoints.

Order of work: check everything that can be checked without processes (config, data, model sizes,
DeepSpeed config); join the process group; find the checkpoint to resume from (converting it to a
universal checkpoint if the world size changed); build the engine; train with validation,
metrics, signal-triggered and periodic checkpoints.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train import checkpointing, distributed, ext_build
from train.config import ModelConfig
from train.data import TokenWindows
from train.ds_config import fill_ds_config, load_ds_config
from train.loss import cross_entropy, lm_loss
from train.metrics import MetricsWriter, mfu, peak_tflops, truncate_metrics
from train.optim import apply_lr, param_groups, torch_adamw
from train.run_config import ConfigError, RunConfig, dump_yaml, resolve_path
from train.schedule import lr_at


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the last good checkpoint is kept."""


@dataclass
class Plan:
    """Everything resolved before any process group exists."""

    cfg: RunConfig
    model_cfg: ModelConfig
    data: TokenWindows
    ds: dict[str, Any]
    world_size: int


def resolve_model_config(cfg: RunConfig, tokenizer_vocab: int) -> ModelConfig:
    overrides = dict(cfg.model.overrides)
    if overrides.get("vocab_size", "auto") == "auto":
        overrides["vocab_size"] = tokenizer_vocab
    if overrides.get("ctx_len", "auto") == "auto":
        overrides["ctx_len"] = cfg.train.ctx_len
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
    data = TokenWindows(manifests, cfg.train.ctx_len, cfg.data.val_documents, cfg.data.seed)
    model_cfg = resolve_model_config(cfg, data.vocab_size)
    data.limit_vocab(model_cfg.vocab_size)  # token ids past the embedding: refused, not an IndexError
    cfg.model.overrides = {
        k: v for k, v in model_cfg.to_dict().items() if k != "preset"
    }  # record the resolved sizes, not "auto"
    ds_path = resolve_path(cfg.ds_config, cfg)
    ds = fill_ds_config(load_ds_config(ds_path), cfg, world_size, origin=str(ds_path))
    return Plan(cfg, model_cfg, data, ds, world_size)


class _StopRequest:
    """SIGTERM / SIGUSR1 (e.g. SLURM preemption): checkpoint at the next step boundary, then exit."""

    def __init__(self) -> None:
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum


def _all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    # On the rank's device: NCCL refuses CPU tensors.
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _grad_norm(engine: Any) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if torch.is_tensor(g) else g)


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.denv = distributed.setup_environment()
        self.rank, self.world = self.denv.rank, self.denv.world_size
        self.plan = plan(cfg, self.world)  # raises ConfigError before any process group starts
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # DeepSpeed's accelerator, not torch.cuda.is_available(): DS_ACCELERATOR=cpu must win on a GPU host.
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        self.device = torch.device(accel.device_name(self.denv.local_rank))
        ext_build.arch_list_for_deepspeed(log=self.log)
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
            found[0] = checkpointing.find_resume_point(self.ckpt_dir, log=self.log)
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
                checkpointing.to_universal(cand.path, log=self.log)
        dist.barrier()
        return cand, universal

    def _build_engine(self, universal: bool) -> None:
        import deepspeed

        from train.model import RWKV

        cfg, p = self.cfg, self.plan
        ds = dict(p.ds)
        if universal:
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        # Built on the rank's own device: a 14B model in fp32 is 56 GB, too much to build on the
        # host once per GPU process.
        with torch.device(self.device):
            model = RWKV(p.model_cfg)
        self.n_params = sum(x.numel() for x in model.parameters())
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layerwise_lr)
        if cfg.optim.name == "torch_adamw":
            opt = torch_adamw(groups, cfg.optim.lr_init, cfg.optim.betas, cfg.optim.eps)
            engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        else:
            engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
        self.engine, self.optimizer = engine, optimizer

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
                    f"RWKV-4 {p.model_cfg.n_layer} layers x {p.model_cfg.n_embd}, "
                    f"{self.n_params:,} parameters, vocab {p.model_cfg.vocab_size}",
                    f"world size {self.world} ({self.denv.launcher}), ZeRO stage {t.zero_stage}"
                    + (" + optimizer offload" if t.offload_optimizer else "")
                    + f", precision {t.precision}, optimizer {cfg.optim.name}",
                    f"tokens/step {tps:,} = micro {t.micro_batch_size} x grad_accum {t.grad_accum} x "
                    f"world {self.world} x ctx {t.ctx_len}; {t.steps} steps = {tps * t.steps:,} tokens",
                    f"data: {p.data.n_chunks:,} windows (magic prime {p.data.prime}), "
                    f"{p.data.n_val_windows} validation windows; run_dir {self.run_dir}",
                    "=" * 72,
                ]
            )
        )

    # ------------------------------------------------------------------------------- loop
    def validate(self) -> float | None:
        cfg, t = self.cfg, self.cfg.train
        if cfg.eval.batches <= 0 or self.plan.data.n_val_windows < self.world:
            return None
        batches = self.plan.data.val_batches(self.rank, self.world, t.micro_batch_size, cfg.eval.batches)
        self.engine.eval()
        total = 0.0
        with torch.no_grad():
            for b in batches:
                b = b.to(self.device)
                total += float(cross_entropy(self.engine(b[:, :-1]), b[:, 1:])) * b.shape[0]
        self.engine.train()
        s, n = _all_reduce([total, float(sum(b.shape[0] for b in batches))], self.device)
        return s / n if n else None

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

    def _optimizer_step(self, step: int, lr: float) -> tuple[float, bool]:
        """Micro-batches of optimizer step `step` (0-based) through the engine.

        Returns (mean loss over ranks and micro-batches, whether the step was skipped because some
        rank saw a non-finite loss)."""
        t, data, engine = self.cfg.train, self.plan.data, self.engine
        apply_lr(self.optimizer, lr)
        loss_sum, bad = 0.0, False
        for micro in range(t.grad_accum):
            batch = data.batch(step, micro, self.rank, self.world, t.micro_batch_size, t.grad_accum)
            batch = batch.to(self.device)
            logits = engine(batch[:, :-1])
            loss, ce = lm_loss(logits, batch[:, 1:], t.l2wrap)
            if (step + 1) in t.fault_nan_steps:
                loss = loss * float("nan")
            value = float(loss.detach())
            finite = math.isfinite(value)
            total, n_bad = _all_reduce([value if finite else 0.0, 0.0 if finite else 1.0], self.device)
            bad = bad or n_bad > 0
            if bad:
                # Keep DeepSpeed's collectives and accumulation counters in step with a
                # zero-gradient backward; lr 0 turns the update into a no-op.
                engine.backward(ce * 0.0)
                apply_lr(self.optimizer, 0.0)
            else:
                engine.backward(loss)
                loss_sum += total
            engine.step()
        return loss_sum / (self.world * t.grad_accum), bad

    def train(self) -> None:
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

        stop = _StopRequest()
        metrics = MetricsWriter(self.run_dir, self.rank == 0, cfg.log.tensorboard)
        tokens_per_step = cfg.tokens_per_step(self.world)
        decay_tokens = o.decay_tokens or max(1, t.steps * tokens_per_step - o.warmup_tokens)
        flops_per_token = self.plan.model_cfg.flops_per_token(t.ctx_len)
        peak = peak_tflops(cfg.log.peak_tflops)
        engine = self.engine
        nan_skips = 0
        last_good = True
        bar = None
        if self.rank == 0 and cfg.log.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
        try:
            while step < t.steps:
                t0 = time.perf_counter()
                lr = lr_at(
                    tokens + tokens_per_step, o.lr_init, o.lr_final, o.warmup_tokens, decay_tokens, o.decay
                )
                loss_mean, bad = self._optimizer_step(step, lr)
                step += 1
                if bad:
                    nan_skips += 1
                    last_good = False
                    self.log(f"WARNING: non-finite loss at step {step}; step skipped "
                             f"({nan_skips} of at most {t.max_nan_skips})")
                    if nan_skips > t.max_nan_skips:
                        raise TrainingError(
                            f"non-finite loss {nan_skips} times (train.max_nan_skips = {t.max_nan_skips}); "
                            f"stopping at step {step}. The last good checkpoint in {self.ckpt_dir} is kept; "
                            "lower optim.lr_init or check the data"
                        )
                    continue
                last_good = True
                tokens += tokens_per_step
                dt = time.perf_counter() - t0
                tps = tokens_per_step / dt
                record: dict[str, Any] = {
                    "step": step,
                    "loss": loss_mean,
                    "lr": lr,
                    "tokens": tokens,
                    "tokens_per_s": tps,
                    "grad_norm": _grad_norm(engine),
                    "mfu": mfu(tps, flops_per_token, self.world, peak),
                }
                if self.device.type == "cuda":
                    record["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                metrics.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{record['mfu']:.2%}"
                    )

                if cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps:
                    val = self.validate()
                    if val is not None:
                        metrics.write({"step": step, "val_loss": val, "tokens": tokens})
                        self.log(f"step {step}: val_loss {val:.4f}")

                (signalled,) = _all_reduce([float(stop.signum)], self.device, op=dist.ReduceOp.MAX)
                if signalled:
                    self.log(f"signal {int(signalled)}: saving a checkpoint at step {step}, then exiting")
                    self.save(step, tokens)
                    return
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.steps and last_good:
                    self.save(step, tokens)

            val = self.validate()
            if val is not None:
                metrics.write({"step": step, "val_loss": val, "tokens": tokens})
                self.log(f"final val_loss {val:.4f}")
            final_tag = self.ckpt_dir / checkpointing.tag_for(step)
            if last_good and not (final_tag / checkpointing.MARKER).exists():
                self.save(step, tokens)
            self.log(f"done: {step} steps, {tokens:,} tokens")
        finally:
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
