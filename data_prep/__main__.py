"""Command line: `python -m data_prep` (prep), `... inspect PREFIX`, `... merge`."""

from __future__ import annotations

import argparse
import os
import sys

from . import BLAS_THREAD_VARS

# Before numpy loads (a BLAS pool per core spun for a tenth of a fast tokenizer's CPU time).
for _var in BLAS_THREAD_VARS:
    os.environ.setdefault(_var, "1")

from .readers import TXT_MODES  # noqa: E402

USAGE_EXTRA = """
subcommands:
  python -m data_prep inspect PREFIX_OR_MANIFEST [--tokenizer SPEC] [--samples N]
  python -m data_prep merge --output MERGED.manifest.json A.manifest.json B.manifest.json ...
"""


def prep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Tokenize a corpus (.jsonl, .jsonl.zst, .parquet, .arrow, .txt, Hugging Face datasets) "
        "into binidx token shards and a manifest.",
        epilog=USAGE_EXTRA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="input files, globs or directories, in order; a Dataset.save_to_disk directory; "
                   "or hf:NAME[:CONFIG]:SPLIT (a hub id or local dataset directory; streamed online, "
                   "from the cache with HF_DATASETS_OFFLINE=1)")
    p.add_argument("--tokenizer", required=True,
                   help="HF tokenizer.json, sentencepiece .model, or 'rwkv-world'")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx (or PREFIX_00000...) "
                   "and PREFIX.manifest.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--shards", type=int, default=1, help="number of output shards (input order kept)")
    p.add_argument("--text-key", default="text", help="JSON/parquet/dataset field holding the text")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    p.add_argument("--eod-token", default=None, help="HF tokenizers: the end-of-document token's text")
    p.add_argument("--include-set", nargs="+", default=None, metavar="NAME",
                   help="keep only records whose meta.pile_set_name is one of these")
    p.add_argument("--exclude-set", nargs="+", default=None, metavar="NAME",
                   help="drop records whose meta.pile_set_name is one of these")
    p.add_argument("--max-documents", type=int, default=None,
                   help="read at most this many input records (the first ones in input order)")
    p.add_argument("--txt-mode", choices=TXT_MODES, default="file",
                   help=".txt inputs: one document per file, per blank-line paragraph, or per line")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="leave out truncated/corrupt compressed files (counted in the manifest) "
                   "instead of stopping")
    p.add_argument("--num-nodes", type=int, default=1, help="split the input files across this many machines")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank in [0, num-nodes); "
                   "output goes to PREFIX-nodeRRR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect":
        from .inspect_shards import main as inspect_main

        return inspect_main(argv[1:])
    if argv and argv[0] == "merge":
        return merge_main(argv[1:])
    args = prep_parser().parse_args(argv)
    from .pipeline import PrepSettings, run_prep

    settings = PrepSettings(
        inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix, workers=args.workers,
        shards=args.shards, text_key=args.text_key, append_eod=not args.no_eod,
        include_sets=args.include_set, exclude_sets=args.exclude_set, max_documents=args.max_documents,
        txt_mode=args.txt_mode, skip_bad_files=args.skip_bad_files, num_nodes=args.num_nodes,
        node_rank=args.node_rank, eod_token=args.eod_token, progress=not args.no_progress,
    )
    try:
        run_prep(settings)
    except (ValueError, OSError) as e:  # OSError: a disk that fills up or an input that vanishes mid-run
        print(f"data_prep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("data_prep: interrupted; completed shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def merge_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep merge",
                                description="Join the manifests of several prep runs (e.g. one per node).")
    p.add_argument("--output", required=True, help="merged manifest path")
    p.add_argument("manifests", nargs="+")
    args = p.parse_args(argv)
    from .manifest import merge_manifests

    try:
        m = merge_manifests(args.manifests, args.output)
    except (ValueError, OSError) as e:
        print(f"data_prep merge: error: {e}", file=sys.stderr)
        return 2
    print(f"data_prep merge: {len(m['shards'])} shards, {m['documents']} documents, {m['tokens']} tokens "
          f"-> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
