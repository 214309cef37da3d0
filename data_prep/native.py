"""Builds data_prep's C++ helpers (`data_prep/csrc/*.cpp`) with the system compiler; loads them with ctypes.

A helper is built once per source version, compiler and flags, into `$RWKV_PREP_BUILD_DIR` (default
`~/.cache/rwkv-pretrain/prep`), named by a hash of all three, so processes, jobs and source versions
never load one another's half-written or stale binaries: a build goes to a temporary file that is
renamed into place, under an `fcntl` lock (the kernel drops it if the builder dies). Workers of one
run build once and the rest wait. No torch, no Python headers: a plain C ABI.

The helpers are optional speed-ups with exact pure fallbacks, so a failed build is a warning (with
the compiler's output) and `load_library` returns None.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
BUILD_DIR_ENV = "RWKV_PREP_BUILD_DIR"
# -ffp-contract=off: the sentencepiece replica must round exactly where sentencepiece rounds.
CXX_FLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-ffp-contract=off")


def build_dir() -> Path:
    env = os.environ.get(BUILD_DIR_ENV)
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "rwkv-pretrain" / "prep"


def library_path(name: str, cxx: str) -> Path:
    source = (SOURCE_DIR / f"{name}.cpp").read_bytes()
    key = hashlib.sha256(b"\0".join([source, cxx.encode(), " ".join(CXX_FLAGS).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    return build_dir() / f"{name}-{key}.so"


def _compile(name: str, cxx: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file: wait for it
        if out.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{name}-", suffix=".so")
        os.close(fd)
        try:
            r = subprocess.run([cxx, *CXX_FLAGS, str(SOURCE_DIR / f"{name}.cpp"), "-o", tmp],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{cxx} exited with {r.returncode}:\n{r.stderr.strip()[-4000:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@functools.cache
def load_library(name: str) -> ctypes.CDLL | None:
    """The helper `csrc/<name>.cpp` as a loaded library, built first if needed; None if it cannot be."""
    cxx = os.environ.get("CXX", "g++")
    try:
        out = library_path(name, cxx)
        if not out.exists():
            _compile(name, cxx, out)
        return ctypes.CDLL(str(out))
    except (OSError, RuntimeError) as e:
        print(f"data_prep: could not build the {name} helper ({e}); using the plain path, which gives the "
              f"same tokens more slowly. Set ${BUILD_DIR_ENV} to a writable directory or $CXX to a C++20 "
              "compiler to enable it.", file=sys.stderr, flush=True)
        return None
