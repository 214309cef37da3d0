"""Helpers the launch scripts call: SLURM host-list expansion off a cluster.

On a SLURM cluster `slurm.sbatch` asks `scontrol show hostnames`; for a dry run on a machine
without SLURM it falls back to `python -m launch.multinode hostnames NODELIST`, which expands
the same compressed syntax (`gpu[01-03,07],login1`) with the trainer's own parser
(`train.distributed.expand_hostlist`), so the scripts and the trainer cannot disagree on a host.
"""

from __future__ import annotations

import argparse
import sys

from train.distributed import expand_hostlist

__all__ = ["expand_hostlist", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.multinode", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hostnames", help="print the hosts of a SLURM node list, one a line")
    p.add_argument("nodelist")
    args = parser.parse_args(argv)
    try:
        hosts = expand_hostlist(args.nodelist)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
