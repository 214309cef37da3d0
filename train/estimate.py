"""Per-GPU memory and throughput of an RWKV training run, on paper.

`python -m train.estimate --preset 14b --nodes 8 --gpus-per-node 8 --zero 2 --ctx-len 4096 --micro-batch 1`

Model states follow mixed-precision Adam under ZeRO (bytes per parameter): 16-bit weights 2,
16-bit gradients 2, and an optimizer part of 16 (fp32 master weights 4, fp32 gradients 4, Adam
moments 8). Stage 1 partitions the optimizer part over the GPUs, stage 2 also the gradients, stage 3
also the weights (plus the largest layer gathered in full, weights and gradients; its gradient
partitions live in the optimizer's fp32 part). Optimizer offload
moves the optimizer part (and, at stage 2, the gradient partitions) to CPU memory. These totals are
checked against DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`), which use the same accounting.

Activations (16-bit), per token: without checkpointing each layer keeps what its architecture
counts (`activation_values_per_layer` in train/models/: e.g. about 30 * n_embd values for RWKV-4),
plus the logits (16-bit) and their fp32 softmax: 6 * vocab bytes. With gradient checkpointing per
block only the block inputs stay (n_embd values per layer), and one block is recomputed at a time.
Framework buffers, fragmentation and communication buckets come on top.

Model construction, per rank, before the engine exists: without zero.Init every rank builds the
whole model in fp32 (4 bytes per parameter; on the GPU, as the trainer does). At ZeRO-3 the
trainer builds under `deepspeed.zero.Init`: parameters are created in the run's precision and
partitioned as soon as their module exists, and `RWKV.init_weights` gathers one parameter at a time
(its 16-bit copy, its fp32 initial value and about one more fp32 copy of QR workspace), so a rank
holds 1/world of the model plus the largest layer.

Host memory at engine init, ZeRO 1/2 (DeepSpeed 0.19 `stage_1_and_2.py`): each parameter group is
flattened into one contiguous 16-bit buffer. When the GPU has room for that buffer beside the
parameters it is built there and the host holds nothing; otherwise every parameter is first copied
to the host and the flat buffer is built there: 2 x 2 bytes per parameter of host memory on every
rank (times the GPUs of a node). With optimizer offload the host also keeps the fp32 master
weights, fp32 gradient partitions and Adam moments, 16 bytes per parameter / world.

Throughput: tokens/s per GPU = MFU x peak FLOP/s / training FLOPs per token (`ModelConfig`).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from train.config import ModelConfig
from train.models import ARCH_TITLES, architecture

BYTES_16 = 2
OPTIMIZER_BYTES = 16  # fp32 master 4 + fp32 grad 4 + Adam m 4 + v 4
LOGIT_BYTES = 6  # 16-bit logits + fp32 softmax, x vocab


@dataclass
class Estimate:
    n_params: int
    largest_layer: int
    gpus: int
    params: int
    grads: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    wkv_scratch: int  # the CUDA WKV backward's per-step scratch, one layer at a time (transient)
    cpu_optimizer: int
    flops_per_token: float

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer


def largest_layer_params(mc: ModelConfig) -> int:
    """Largest single weight (DeepSpeed's `largest_layer_params`): embedding/head or a 4D x D matrix."""
    return max(mc.vocab_size * mc.n_embd, mc.dim_ffn * mc.n_embd, mc.dim_att * mc.n_embd)


def wkv_scratch_bytes(mc: ModelConfig, ctx_len: int, micro_batch: int) -> int:
    """Transient memory of the WKV kernel's backward, one layer at a time (the architecture's count)."""
    return architecture(mc.arch).wkv_scratch_bytes(mc, ctx_len, micro_batch)


def estimate(
    mc: ModelConfig, gpus: int, zero: int, ctx_len: int, micro_batch: int, offload: bool = False
) -> Estimate:
    P, N, big = mc.n_params(), gpus, largest_layer_params(mc)
    params = BYTES_16 * P
    grads = BYTES_16 * P
    optimizer = OPTIMIZER_BYTES * P
    if zero >= 1:
        optimizer = OPTIMIZER_BYTES * P // N
    if zero >= 2:
        grads = BYTES_16 * P // N
    if zero >= 3:
        # Stage 3 reduce-scatters 16-bit gradients straight into the optimizer's fp32 partition:
        # only the layer being worked on holds full 16-bit weights and gradients.
        params = BYTES_16 * P // N + BYTES_16 * big
        grads = BYTES_16 * big
    cpu_optimizer = 0
    if offload:
        cpu_optimizer = optimizer
        optimizer = 0
        if zero == 2:
            grads = 0  # reduced gradient partitions go straight to the CPU optimizer
        if zero == 3:
            grads = BYTES_16 * big
    tokens = ctx_len * micro_batch
    D, L, V = mc.n_embd, mc.n_layer, mc.vocab_size
    layer_act = architecture(mc.arch).activation_values_per_layer(mc) * BYTES_16
    activations = tokens * (L * layer_act + LOGIT_BYTES * V)
    checkpointed = tokens * (L * D * BYTES_16 + layer_act + LOGIT_BYTES * V)
    scratch = wkv_scratch_bytes(mc, ctx_len, micro_batch)
    return Estimate(P, big, N, params, grads, optimizer, activations, checkpointed, scratch, cpu_optimizer,
                    mc.flops_per_token(ctx_len))


def construction_bytes(mc: ModelConfig, gpus: int, zero_init: bool, param_bytes: int = BYTES_16) -> int:
    """Peak bytes per rank while the model is built (see the module docstring)."""
    if not zero_init:
        return 4 * mc.n_params()
    return param_bytes * math.ceil(mc.n_params() / gpus) + (param_bytes + 8) * largest_layer_params(mc)


def zero12_host_staging(mc: ModelConfig, gpu_bytes: int, param_bytes: int = BYTES_16) -> int:
    """Host bytes per rank that ZeRO 1/2 stage at engine init to flatten the parameters: none when
    the flat 16-bit buffer fits on the GPU beside the (already 16-bit) parameters, else a host copy
    of every parameter plus the host flat buffer."""
    flat = param_bytes * mc.n_params()
    return 0 if gpu_bytes - flat >= flat else 2 * flat


def deepspeed_model_states(
    n_params: int, largest_layer: int, zero: int, gpus_per_node: int, nodes: int, offload: bool
) -> int | None:
    """GPU bytes for model states by DeepSpeed's estimator (stages 2 and 3; None otherwise)."""
    if zero == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(n_params, gpus_per_node, nodes, cpu_offload=offload)
        return gpu
    if zero == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            n_params, largest_layer, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=False
        )
        return gpu
    return None


def _gib(x: float) -> str:
    return f"{x / 2**30:8.2f} GiB"


def report(args: argparse.Namespace) -> str:
    overrides = {"ctx_len": args.ctx_len, "wkv_chunk_len": args.wkv_chunk_len}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    mc = ModelConfig.from_preset(args.preset, **overrides)
    gpus = args.nodes * args.gpus_per_node
    e = estimate(mc, gpus, args.zero, args.ctx_len, args.micro_batch, args.offload)
    ds = deepspeed_model_states(e.n_params, e.largest_layer, args.zero, args.gpus_per_node, args.nodes,
                                args.offload)
    tps = args.mfu * args.peak_tflops * 1e12 / e.flops_per_token
    scratch = e.wkv_scratch
    lines = [
        f"{ARCH_TITLES[mc.arch]} {args.preset}: {mc.n_layer} layers x {mc.n_embd}, vocab {mc.vocab_size}, "
        f"{e.n_params / 1e9:.3f} B parameters (largest layer {e.largest_layer / 1e6:.1f} M)",
        f"{args.nodes} node(s) x {args.gpus_per_node} GPUs = {gpus}; ZeRO {args.zero}"
        + (" + optimizer offload" if args.offload else "")
        + f"; micro-batch {args.micro_batch} x ctx {args.ctx_len}",
        "per-GPU memory:",
        f"  parameters (16-bit)               {_gib(e.params)}",
        f"  gradients (16-bit)                {_gib(e.grads)}",
        f"  optimizer (fp32 master+grad+Adam) {_gib(e.optimizer)}",
        f"  = model states                    {_gib(e.model_states)}",
        f"  activations, no checkpointing     {_gib(e.activations)}",
        f"  activations, grad_cp              {_gib(e.activations_checkpointed)}",
        f"  WKV backward scratch (transient)  {_gib(e.wkv_scratch)}"
        + (f" (chunks of {mc.wkv_chunk_len})" if mc.wkv_chunk_len else " (model.wkv_chunk_len bounds it)"),
        f"  total (grad_cp)                   {_gib(e.model_states + e.activations_checkpointed + scratch)}",
        f"  total (no checkpointing)          {_gib(e.model_states + e.activations + scratch)}",
    ]
    if e.cpu_optimizer:
        lines.append(f"  CPU memory for the offloaded optimizer, per GPU {_gib(e.cpu_optimizer)}")
    lines += [
        "model construction, peak per rank (before the engine):",
        f"  whole model in fp32 (no zero.Init)    {_gib(construction_bytes(mc, gpus, False))}",
        f"  zero.Init (ZeRO-3: 1/world + largest) {_gib(construction_bytes(mc, gpus, True))}"
        + ("  <- this run" if args.zero == 3 else ""),
    ]
    if args.zero in (1, 2):
        staged = zero12_host_staging(mc, int(args.gpu_mem_gib * 2**30))
        where = "flat buffer on the GPU" if staged == 0 else "flat buffer staged on the host"
        lines.append(f"host memory per rank at engine init      {_gib(staged)} ({where})")
    if ds is None:
        lines.append(f"DeepSpeed has no model-state estimator for ZeRO {args.zero}")
    else:
        diff = abs(ds - e.model_states)
        verdict = "agrees" if diff <= 16 else "DISAGREES"
        lines.append(
            f"DeepSpeed's estimator: model states {_gib(ds)} per GPU ({verdict}, difference {diff} B)"
        )
    lines += [
        f"training FLOPs per token {e.flops_per_token / 1e9:.2f} GFLOP; at {args.mfu:.0%} MFU of "
        f"{args.peak_tflops:g} TFLOP/s: {tps:,.0f} tokens/s per GPU, {tps * gpus:,.0f} tokens/s in all",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.estimate", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="1b5")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--offload", action="store_true", help="optimizer CPU offload")
    ap.add_argument("--ctx-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--wkv-chunk-len", type=int, default=0, help="model.wkv_chunk_len (0: whole window)")
    ap.add_argument("--vocab-size", type=int, default=0, help="default: the preset's (50277)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU (H100: 80)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, bf16 dense (H100 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    args = ap.parse_args(argv)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
