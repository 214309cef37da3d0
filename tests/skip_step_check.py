"""Run under torchrun (2 processes): a step with a NaN inside rank 0's forward leaves every rank's
weights and optimizer state bit-identical, and training goes on with finite losses.

    torchrun --nproc_per_node 2 tests/skip_step_check.py MANIFEST RUN_ROOT PRECISION [ARCH] STAGE [STAGE ...]

ARCH: rwkv4 (the default: configs/tiny.yaml's model) or rwkv7 (the rwkv7-tiny preset at 2 x 64, whose
layer-0 v0/v1/v2 never get a gradient).

For each ZeRO stage, in one process group: a Trainer on the tiny model (grad_accum 2, NaN in the
first micro-batch of step 3 on rank 0 only), two good steps, the snapshot of everything DeepSpeed
checkpoints for the optimizer (`engine.optimizer.state_dict()`: fp32 master weights, Adam moments
and step counts) and of the model's own weights (this rank's ZeRO-3 partition), the bad step, the
snapshot again, then one more step. Rank 0 prints one `RESULT {json}` line per stage.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.run_config import load_run_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402

# Not optimizer state: the hyperparameters (the skipped step sets lr 0 on purpose), and the fp16/bf16
# optimizers' loss-scaler iteration count (ZeRO 0 in bf16 with a torch optimizer), which counts engine
# steps as DeepSpeed's global_steps does, its own overflow skips included.
NOT_STATE = {"param_groups", "cur_iter"}


def snapshot(engine: Any) -> list[torch.Tensor]:
    """Every tensor and number of the optimizer's state dict (hyperparameters aside) and the weights."""
    out: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if torch.is_tensor(x):
            out.append(x.detach().to("cpu", copy=True))
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if k not in NOT_STATE:
                    walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(torch.tensor(float(x), dtype=torch.float64))  # e.g. a step count kept as int

    walk(engine.optimizer.state_dict())
    for p in engine.module.parameters():
        out.append(getattr(p, "ds_tensor", p).detach().to("cpu", copy=True))
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8),
                                                                  y.view(-1).view(torch.uint8))
        for x, y in zip(a, b, strict=True)
    )


ARCH_SETS = {"rwkv4": [], "rwkv7": ["model.preset=rwkv7-tiny", "model.n_embd=64"]}


def check(manifest: str, run_dir: Path, precision: str, stage: int, arch: str = "rwkv4") -> dict[str, Any]:
    sets = [f"data.manifests=[{manifest}]", f"run_dir={run_dir}", "log.progress=false",
            "log.tensorboard=false", f"train.precision={precision}", f"train.zero_stage={stage}",
            "train.grad_accum=2", "train.micro_batch_size=2", "train.steps=4", "train.fault_nan_steps=[3]",
            "checkpoint.every=0", "eval.every=0", "model.n_layer=2", *ARCH_SETS[arch]]
    trainer = Trainer(load_run_config(REPO / "configs" / "tiny.yaml", sets))
    trainer._setup_run()
    engine, lr = trainer.engine, 1e-3
    losses = [trainer._train_step(s, lr).loss for s in (0, 1)]
    before = snapshot(engine)
    bad = trainer._train_step(2, lr)
    after = snapshot(engine)
    norm = engine.get_global_grad_norm()  # DeepSpeed's norm of the (gated) gradients of the bad step
    norm = None if norm is None else float(norm)
    losses.append(trainer._train_step(3, lr).loss)
    later = snapshot(engine)
    weights_finite = all(bool(torch.isfinite(t.float()).all()) for t in later if t.is_floating_point())
    ok = torch.tensor([float(same(before, after))], dtype=torch.float64)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    trainer.gate.remove()
    return {
        "stage": stage, "precision": precision, "arch": trainer.plan.model_cfg.arch,
        "skipped": bad.skipped, "n_bad": bad.n_bad,
        "unchanged_all_ranks": bool(ok.item()), "unchanged": same(before, after),
        "changed_after": not same(after, later), "n_tensors": len(before),
        "losses": losses, "losses_finite": all(x is not None and math.isfinite(x) for x in losses),
        "grad_norm_at_skip": norm, "weights_finite": weights_finite,
    }


def main() -> None:
    manifest, root, precision, stages = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    arch = stages.pop(0) if stages and not stages[0].isdigit() else "rwkv4"
    for stage in map(int, stages):
        result = check(manifest, root / f"{arch}_{precision}_zero{stage}", precision, stage, arch)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)
        dist.barrier()


if __name__ == "__main__":
    main()
