"""Convert trained weights into inference formats.

    python -m launch.convert --input CKPT --to {rwkv,hf,fp32} --output PATH
                             [--tag TAG] [--dtype fp32|bf16|fp16] [--verify]

``--input`` is a DeepSpeed checkpoint directory (any ZeRO stage; the tag in
``latest`` unless ``--tag``), a consolidated state dict file, or a Hugging Face
directory written by this tool.  Outputs:

* ``rwkv``: a ``.pth`` for the ``rwkv`` pip package (RWKV-LM key layout, raw values);
* ``hf``:   a directory with ``config.json`` + ``model.safetensors`` for
  ``transformers.RwkvForCausalLM``;
* ``fp32``: the consolidated state dict of our model (``torch.save``).

Tensors are moved from the source to the output one at a time; memory-mapped
sources are never copied when no dtype cast is asked for, so peak memory stays
near one copy of the model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_prep.output_paths import OutputPathError, check_writable_dir, check_writable_file
from launch.checkpoint_io import CheckpointError, LoadedWeights, find_tokenizer_spec
from launch.hf_format import NO_HF_FORMAT, OWN_LAYOUT_ONLY, hf_format
from launch.model_loading import SIDECAR_NAME_HF, load_any_weights, model_config_from

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def own_layout_note(arch: str) -> str:
    title = OWN_LAYOUT_ONLY[arch]
    return (f"{title} weights: the .pth is this pipeline's own layout with its .json sidecar; the `rwkv` "
            f"package cannot load it (it has no {title} code), so use launch/generate.py or "
            "launch.model_loading.load_model")


DEFAULT_VERIFY_TEXT = (
    "ROMEO. But soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun."
)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _take(loaded: LoadedWeights, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One tensor moved out of the source and cast; the source copy's memory is let go."""
    src = loaded.pop_tensor(name)
    out = _cast(src, dtype)
    if out is not src:
        _check_cast(loaded, name, src, out)
        loaded.release(src)
    return out


def _check_cast(loaded: LoadedWeights, name: str, src: torch.Tensor, out: torch.Tensor) -> None:
    """Refuse a cast that turned finite weights into inf (fp16 tops out at 65504): data would be lost."""
    if out.dtype == torch.float16 and not torch.isfinite(out).all() and torch.isfinite(src).all():
        raise CheckpointError(
            f"{loaded.source}: {name} holds values up to {src.abs().max().item():.4g}, beyond fp16's "
            f"{torch.finfo(torch.float16).max:.0f}; convert with --dtype bf16 or fp32"
        )


def _sidecar(loaded: LoadedWeights) -> dict[str, Any]:
    """What generate/verify need later: the model config and the tokenizer of the run."""
    side: dict[str, Any] = {"model": model_config_from(loaded.model_config or {}).to_dict()}
    tok = find_tokenizer_spec(loaded.run_config, loaded.base_dir)
    if tok:
        side["tokenizer"] = {"spec": tok}
    side["source"] = loaded.source
    return side


def _eod_id(loaded: LoadedWeights) -> int:
    """End-of-document id for HF's bos/eos: the tokenizer's when it can be loaded, else 0."""
    spec = find_tokenizer_spec(loaded.run_config, loaded.base_dir)
    if spec:
        try:
            from data_prep.tokenizer import load_tokenizer

            return int(load_tokenizer(spec).eod_id)
        except Exception:  # tokenizer moved or unreadable: HF's default is still usable
            pass
    return 0


def write_torch_state_dict(loaded: LoadedWeights, output: Path, dtype: torch.dtype) -> None:
    """rwkv .pth and fp32 outputs: same key layout as our model, one torch.save."""
    names = list(loaded.tensors)
    out: dict[str, torch.Tensor] = {}
    for name in tqdm(names, desc="collect", unit="tensor", leave=False):
        out[name] = _take(loaded, name, dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.save(out, tmp)
    os.replace(tmp, output)  # never leave a half-written file under the final name


def _readable_like_other_files(path: Path) -> None:
    """safetensors creates its file owner-only (0600); give it the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_hf(loaded: LoadedWeights, output: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    shapes = loaded.shapes()
    cfg = model_config_from(loaded.model_config or {})
    fmt = hf_format(cfg.arch)
    output.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for name in tqdm(list(loaded.tensors), desc="rename", unit="tensor", leave=False):
        renamed = fmt.hf_tensor(name, _take(loaded, name, dtype))
        if renamed is not None:  # None: a tensor the HF layout has no place for (unused by the math)
            out[renamed[0]] = renamed[1].contiguous()
    tmp = output / "model.safetensors.tmp"
    save_file(out, str(tmp), metadata={"format": "pt"})
    _readable_like_other_files(tmp)
    os.replace(tmp, output / "model.safetensors")
    del out
    hf = fmt.hf_config(cfg.to_dict(), shapes, eos_id=_eod_id(loaded))
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (output / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def output_path(to: str, output: Path) -> Path:
    # the rwkv package appends ".pth" to any name that lacks it
    if to == "rwkv" and output.suffix != ".pth":
        return output.with_name(output.name + ".pth")
    return output


def check_output(to: str, out: Path) -> None:
    """Refuse, before loading anything, an output that cannot be written (directory for hf)."""
    if to == "hf":
        check_writable_dir(out, "the Hugging Face model directory")
    else:
        check_writable_file(out, f"the {to} weights")
        check_writable_file(out.with_suffix(".json"), "the model config beside the weights")


def convert(
    input: str | Path,
    to: str,
    output: str | Path,
    tag: str | None = None,
    dtype: str = "fp32",
    model_config_path: str | Path | None = None,
    verify: bool = False,
) -> Path:
    """Convert and return the path written (file for rwkv/fp32, directory for hf). With `verify`, a
    conversion whose verifier package is missing is refused before anything is written."""
    if to not in ("rwkv", "hf", "fp32"):
        raise ValueError(f"unknown output format {to!r}; expected rwkv, hf or fp32")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    out = output_path(to, Path(output))
    check_output(to, out)
    # checks every tensor of every layer against the architecture: nothing is dropped silently
    loaded = load_any_weights(input, tag=tag, model_config_path=model_config_path)
    side = _sidecar(loaded)
    if to == "hf" and side["model"]["arch"] in NO_HF_FORMAT:  # refused before anything is written
        raise CheckpointError(f"{loaded.source}: {NO_HF_FORMAT[side['model']['arch']]}")
    if verify:
        needed = verifier_package(to, side["model"]["arch"])
        if needed and importlib.util.find_spec(needed) is None:
            raise CheckpointError(
                f"--verify --to {to} runs the weights in the `{needed}` package, which is not installed "
                f"(pip install {needed.replace('_', '-')}), or leave out --verify"
            )
    if to == "hf":
        write_hf(loaded, out, DTYPES[dtype])
        (out / SIDECAR_NAME_HF).write_text(json.dumps(side, indent=2) + "\n")
    else:
        write_torch_state_dict(loaded, out, DTYPES[dtype])
        out.with_suffix(".json").write_text(json.dumps(side, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- verification


def verify_tokens(text: str, tokenizer_spec: str | None, vocab_size: int, n_random: int = 64) -> torch.Tensor:
    """Token ids to verify on: the text through the run's tokenizer, else fixed pseudo-random ids."""
    if tokenizer_spec:
        from data_prep.tokenizer import load_tokenizer

        ids = load_tokenizer(tokenizer_spec).encode(text)
        if ids:
            return torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (n_random,), generator=g)


# The rwkv package picks its RWKV-7 code at import time (RWKV_V7_ON=1), so RWKV-7 weights run in a
# process of their own: this one may have imported the package already, or need it for RWKV-4.
_RWKV7_PACKAGE_SCRIPT = """
import sys, torch
from rwkv.model import RWKV
model = RWKV(model=sys.argv[1], strategy="cpu fp32")
tokens = torch.load(sys.argv[2])
with torch.no_grad():
    logits, _ = model.forward(tokens.tolist(), None, full_output=True)
torch.save(logits.float(), sys.argv[3])
"""


def rwkv_package_logits(path: Path, tokens: torch.Tensor, arch: str) -> torch.Tensor:
    """fp32 logits (T, V) of a .pth in the `rwkv` package (strategy cpu fp32)."""
    if arch == "rwkv7":
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tok_file, out_file = Path(tmp) / "tokens.pt", Path(tmp) / "logits.pt"
            torch.save(tokens, tok_file)
            env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1"}
            # the package loads "<model>.pth": it is given the path without the suffix
            cmd = [sys.executable, "-c", _RWKV7_PACKAGE_SCRIPT, str(path.with_suffix("")), tok_file, out_file]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CheckpointError(f"{path}: the rwkv package could not run it:\n{proc.stderr[-3000:]}")
            return torch.load(out_file)
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as RwkvPackageModel

    pkg = RwkvPackageModel(model=str(path), strategy="cpu fp32", verbose=False)
    logits, _ = pkg.forward(tokens.tolist(), None, full_output=True)
    return logits.float()


def converted_logits(to: str, path: Path, tokens: torch.Tensor, arch: str = "rwkv4") -> torch.Tensor:
    """fp32 logits (T, V) of the converted weights, run by the package that consumes that format."""
    if to == "rwkv" and arch not in OWN_LAYOUT_ONLY:
        return rwkv_package_logits(path, tokens, arch)
    if to == "hf":
        hf = hf_format(arch).load_hf_model(path)
        with torch.no_grad():
            return hf(tokens.unsqueeze(0)).logits[0].float()
    from launch.model_loading import load_model

    model = load_model(path, wkv_backend="reference").model
    with torch.no_grad():
        return model(tokens.unsqueeze(0))[0].float()


def verify(
    input: str | Path,
    to: str,
    converted: Path,
    tag: str | None = None,
    model_config_path: str | Path | None = None,
    text: str = DEFAULT_VERIFY_TEXT,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Max |logit difference| between our model on the source weights and the converted weights."""
    from launch.model_loading import model_from_tensors

    loaded = load_any_weights(input, tag=tag, model_config_path=model_config_path)
    cfg = model_config_from(loaded.model_config or {}, {"wkv_backend": "reference"})
    spec = tokenizer or find_tokenizer_spec(loaded.run_config, loaded.base_dir)
    tokens = verify_tokens(text, spec, cfg.vocab_size)
    model = model_from_tensors(loaded.tensors, cfg, loaded.source)
    with torch.no_grad():
        ours = model(tokens.unsqueeze(0))[0].float()
    del model, loaded
    theirs = converted_logits(to, converted, tokens, cfg.arch)
    diff = (ours - theirs).abs().max().item()
    return {
        "max_abs_logit_diff": diff,
        "tokens": int(tokens.numel()),
        "text": "tokenizer" if spec else "random token ids",
        "logit_scale": ours.abs().max().item(),
    }


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rwkv-convert",
        description="Convert a DeepSpeed checkpoint or state dict to rwkv .pth, HF or fp32 weights.",
    )
    p.add_argument(
        "--input",
        required=True,
        help="DeepSpeed checkpoint dir (run's checkpoints/ or a tag dir) or a state dict file",
    )
    p.add_argument("--to", required=True, choices=["rwkv", "hf", "fp32"])
    p.add_argument("--output", required=True, help="output file (rwkv, fp32) or directory (hf)")
    p.add_argument("--tag", help="checkpoint tag to read (default: the one named in 'latest')")
    p.add_argument(
        "--dtype", default="fp32", choices=list(DTYPES), help="cast floating tensors (default fp32)"
    )
    p.add_argument(
        "--model-config",
        help="JSON with the model config (a 'model' section or ModelConfig fields) "
        "for a state dict without one beside it",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="run our model and the converted weights on a text and report the max logit difference",
    )
    p.add_argument("--verify-text", default=DEFAULT_VERIFY_TEXT)
    p.add_argument("--tokenizer", help="tokenizer spec for --verify (default: the run's, if recorded)")
    return p


def verifier_package(to: str, arch: str) -> str | None:
    """The package that consumes a format, which --verify runs the converted weights with."""
    if arch in OWN_LAYOUT_ONLY:
        return None  # verified by reading the file back with our own loader
    if to == "rwkv":
        return "rwkv"
    return hf_format(arch).VERIFIER_PACKAGE if to == "hf" else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Checked before converting: a conversion that cannot be verified as asked writes nothing. The package
    # every architecture needs is checked here, before loading; convert() checks the architecture's own.
    needed = verifier_package(args.to, "rwkv4")
    if args.verify and needed and importlib.util.find_spec(needed) is None:
        print(f"rwkv-convert: error: --verify --to {args.to} runs the weights in the `{needed}` package, "
              f"which is not installed (pip install {needed}), or leave out --verify", file=sys.stderr)
        return 2
    try:
        out = convert(args.input, args.to, args.output, args.tag, args.dtype, args.model_config, args.verify)
        print(f"wrote {args.to} weights ({args.dtype}) to {out}")
        arch = json.loads(out.with_suffix(".json").read_text())["model"]["arch"] if args.to != "hf" else ""
        if arch in OWN_LAYOUT_ONLY:
            print(f"note: {own_layout_note(arch)}" + ("; --verify reads the file back with our loader"
                                                       if args.verify else ""))
        if args.verify:
            report = verify(
                args.input, args.to, out, args.tag, args.model_config, args.verify_text, args.tokenizer
            )
            print(
                f"verify: max |logit diff| = {report['max_abs_logit_diff']:.3e} "
                f"over {report['tokens']} tokens "
                f"({report['text']}; logits up to {report['logit_scale']:.2f})"
            )
    except (CheckpointError, OutputPathError) as e:
        print(f"rwkv-convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up while writing
        print(f"rwkv-convert: error: writing {args.output}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
