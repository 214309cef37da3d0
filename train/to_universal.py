"""Universal checkpoints for a change of world size: `ds_to_universal` of one tag, done once.

    python -m train.to_universal RUN_DIR/checkpoints [--tag stepN]

converts ahead of time (e.g. as a job step before the training step). Otherwise the trainer
converts when it resumes at another world size: rank 0 runs the conversion while the other ranks
poll the filesystem for its completion marker. No collective is pending meanwhile, so a conversion
of any length (hours for 14B) cannot run into the NCCL/gloo collective timeout.

`stepN_universal/complete.json` is written last and names the source tag's marker (sha256): a
directory without it (a conversion killed part-way) or made from an older save of the same step is
removed and converted again. A failed conversion leaves `stepN_universal.failed` so that waiting
ranks stop with its message instead of waiting forever.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from train.checkpoint_marker import MARKER, check_tag, write_marker

SUFFIX = "_universal"
FAILED_SUFFIX = SUFFIX + ".failed"


class UniversalError(RuntimeError):
    """The conversion failed (here, or on rank 0 while this rank waited)."""


def universal_dir(src: Path) -> Path:
    return src.with_name(src.name + SUFFIX)


def failure_file(src: Path) -> Path:
    return src.with_name(src.name + FAILED_SUFFIX)


def source_id(src: Path) -> str:
    """Identity of the saved tag: its marker's bytes (step, world size, every file's size)."""
    return hashlib.sha256((src / MARKER).read_bytes()).hexdigest()


def is_converted(src: Path) -> bool:
    """A complete, intact conversion of this very save of src exists."""
    meta, _ = check_tag(universal_dir(src))
    return meta is not None and meta.get("source") == source_id(src)


def clear_failure(src: Path) -> None:
    failure_file(src).unlink(missing_ok=True)


def convert(src: Path, log: Callable[[str], None] = print, output: IO[bytes] | None = None) -> Path:
    """ds_to_universal src -> src_universal, unless already done; its progress goes to output."""
    out = universal_dir(src)
    if is_converted(src):
        log(f"{out}: already converted, reused")
        return out
    sid = source_id(src)
    if out.exists():
        log(f"{out}: no valid {MARKER} (a conversion cut short, or of an older save); converting again")
        shutil.rmtree(out)
    clear_failure(src)
    log(f"converting {src} to a universal checkpoint in {out} (world size changed); "
        "ds_to_universal's progress follows")
    t0 = time.monotonic()
    try:
        _run_ds_to_universal(src, out, output)
        # The client state (step, tokens, config) lives in the model-state files; keep ours beside it.
        for f in src.glob("*mp_rank_*_model_states.pt"):
            if not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
        saved = json.loads((src / MARKER).read_text())
        write_marker(out, {"from": src.name, "source": sid, "step": saved.get("step"),
                           "world_size": saved.get("world_size")})
    except BaseException as e:
        failure_file(src).write_text(json.dumps({"source": sid, "error": f"{type(e).__name__}: {e}"[-4000:]}))
        raise
    log(f"converted {src} in {time.monotonic() - t0:.0f} s")
    return out


def _run_ds_to_universal(src: Path, out: Path, output: IO[bytes] | None) -> None:
    """Run DeepSpeed's converter, passing its output (tqdm bars included) through as it comes."""
    if output is None:
        output = getattr(sys.stdout, "buffer", None) or sys.stderr.buffer
    cmd = [sys.executable, "-u", "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(src), "--output_folder", str(out), "--inject_missing_state"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail = bytearray()
    while chunk := proc.stdout.read1(65536):
        output.write(chunk)
        output.flush()
        tail += chunk
        del tail[:-6000]
    rc = proc.wait()
    if rc != 0:
        raise UniversalError(
            f"ds_to_universal failed on {src} (exit {rc}):\n{tail.decode(errors='replace')}"
        )


def wait_for(src: Path, rank: int, poll_s: float = 2.0, report_s: float = 60.0,
             timeout_s: float | None = None) -> Path:
    """Wait (filesystem only, no collective) until rank 0 has converted src; report progress."""
    out, sid, t0 = universal_dir(src), source_id(src), time.monotonic()
    print(f"[train] rank {rank}: waiting for rank 0 to convert {src} into {out}", flush=True)
    next_report = t0 + report_s
    while not is_converted(src):
        failed = failure_file(src)
        if failed.is_file():
            try:
                info = json.loads(failed.read_text())
            except json.JSONDecodeError:
                info = {}
            if info.get("source") == sid:
                raise UniversalError(f"rank 0 could not convert {src}: {info.get('error', '')[-2000:]}")
        now = time.monotonic()
        if timeout_s is not None and now - t0 > timeout_s:
            raise UniversalError(f"rank {rank}: {out} not converted after {timeout_s:.0f} s")
        if now >= next_report:
            written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else 0
            print(f"[train] rank {rank}: still waiting for {out} ({now - t0:.0f} s, "
                  f"{written / 2**30:.2f} GiB written so far)", flush=True)
            next_report = now + report_s
        time.sleep(poll_s)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.to_universal", description=__doc__.split("\n")[0])
    ap.add_argument("path", type=Path, help="a run's checkpoints/ directory, or one stepN tag in it")
    ap.add_argument("--tag", help="tag to convert (default: the newest complete one)")
    args = ap.parse_args(argv)
    from train.checkpointing import TAG_RE, find_resume_point

    if args.tag:
        src = args.path / args.tag
    elif TAG_RE.match(args.path.name):
        src = args.path
    else:
        cand = find_resume_point(args.path)
        if cand is None:
            print(f"error: {args.path}: no complete checkpoint tag", file=sys.stderr)
            return 2
        src = cand.path
    meta, reason = check_tag(src)
    if meta is None:
        print(f"error: {src}: {reason}", file=sys.stderr)
        return 2
    try:
        convert(src)
    except UniversalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
