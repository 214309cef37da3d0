"""Helpers the launch scripts call: SLURM host-list expansion off a cluster.

On a SLURM cluster `slurm.sbatch` asks `scontrol show hostnames`; for a dry run on a machine
without SLURM it falls back to `python -m launch.multinode hostnames NODELIST`, which expands
the same compressed syntax (`gpu[01-03,07],login1`).
"""

from __future__ import annotations

import argparse
import re
import sys

_BRACKET = re.compile(r"\[([^\]]*)\]")


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {nodelist!r}")
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {nodelist!r}")
    parts.append(nodelist[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in host list {nodelist!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in host list {nodelist!r}")
        width = len(lo)  # zero padding follows the lower bound, as SLURM does
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: `node[01-02],gpu[1,3-4]x` -> node01 node02 gpu1x ..."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        names = [""]
        pos = 0
        for m in _BRACKET.finditer(part):
            names = [n + part[pos : m.start()] for n in names]
            names = [n + r for n in names for r in _expand_range(m.group(1), nodelist)]
            pos = m.end()
        hosts.extend(n + part[pos:] for n in names)
    return hosts


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
