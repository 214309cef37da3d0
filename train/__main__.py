"""`python -m train --config configs/X.yaml [--set key=value ...]` (console script `rwkv-train`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rwkv-train",
        description="Train an RWKV model with DeepSpeed ZeRO (launch with torchrun, deepspeed, srun, "
        "or run as a single process).",
    )
    parser.add_argument("--config", help="YAML run config (see configs/ and docs/training.md)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=100 --set model.n_layer=6 (repeatable)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)  # older deepspeed launchers pass it as a flag

    from data_prep.output_paths import OutputPathError, check_writable_dir
    from train.run_config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
        # Every rank writes checkpoints here: check before DeepSpeed starts (ranks race: keep it).
        check_writable_dir(cfg.run_dir, "the run's checkpoints and logs (run_dir)", keep_created=True)
        from train.trainer import run

        return run(cfg)
    except ConfigError as e:
        print(f"[train] config error: {e}", file=sys.stderr, flush=True)
        return 2
    except OutputPathError as e:
        print(f"[train] error: {e}", file=sys.stderr, flush=True)
        return 2


def cli(argv: list[str] | None = None) -> NoReturn:
    """`python -m train` and `rwkv-train`: `main`, then exit with its code without interpreter teardown.

    After a distributed run has finished (checkpoint written, process group destroyed), DeepSpeed's and
    gloo's native threads can still abort the interpreter's teardown ("terminate called without an
    active exception", SIGABRT); a launcher or scheduler would then see -6 instead of the run's 0 or 2.
    """
    rc = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    cli()
