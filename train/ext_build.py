"""Just-in-time builds of the project's torch extensions that hold up on a cluster's shared filesystem.

``torch.utils.cpp_extension.load`` builds with ninja in a directory named after the extension and guards
it with a lock file. On a cluster that goes wrong three ways: a job killed mid-build leaves the lock file
behind and every later job waits on it forever, in silence; one directory shared by nodes with different
torch, CUDA or GPUs mixes their objects; and a failed build says little. Here:

- the directory name carries a key of everything the binary depends on (Python, torch and CUDA versions,
  the CUDA arch list, compiler flags, the sources' and headers' contents), as torch keys by Python/CUDA;
- a builder first takes an exclusive ``fcntl`` lock on ``<dir>.lock``; the kernel drops it when a
  process dies, so a killed build never blocks anyone. One rank builds, the others wait (saying who holds
  the lock) and then load the finished module: eight ranks on a node build once;
- torch's own lock file, found while we hold ours, can only be a killed build's leftover: it is removed,
  with a message;
- a failure carries the compiler's output, also kept in ``build.log`` beside the objects.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

BUILD_DIR_ENV = "RWKV_WKV_BUILD_DIR"
# How long a waiting rank tolerates another's build before giving up (a cold CUDA build takes ~1 min).
WAIT_TIMEOUT_ENV = "RWKV_EXT_BUILD_TIMEOUT"
DEFAULT_WAIT_TIMEOUT_S = 3600.0
TORCH_LOCK_NAME = "lock"  # torch.utils.file_baton's file inside the build directory


class ExtensionBuildError(RuntimeError):
    """An extension failed to build or load; the message carries the compiler's output and where to look."""


def cuda_arch_list() -> str:
    """The arch list torch compiles CUDA sources for: $TORCH_CUDA_ARCH_LIST, else the visible GPUs'."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return "none"


_PLAIN_ARCH = re.compile(r"^\d+\.\d+(\+PTX)?$")


def _stderr(message: str) -> None:
    """Build messages go to stderr: stdout may be a program's output (generated text, JSON)."""
    print(message, file=sys.stderr, flush=True)


def arch_list_for_deepspeed(log=_stderr) -> None:
    """Make $TORCH_CUDA_ARCH_LIST one that DeepSpeed's op builder can read, before it JIT-builds an op.

    Some CUDA images export arch-specific entries such as ``9.0a``; torch accepts them, but DeepSpeed
    (0.19) parses each entry as numbers and every run dies building FusedAdam (``invalid literal for
    int(): '0a'``). The suffix only enables instructions that kernels must ask for, which neither
    DeepSpeed's ops nor ours do, so ``9.0a`` becomes ``9.0``.
    """
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    entries = [e for e in re.split(r"[;\s]+", value.strip()) if e]
    if not entries or all(_PLAIN_ARCH.match(e) for e in entries):
        return
    fixed = []
    for e in entries:
        m = re.match(r"^(\d+\.\d+)[a-z]*(\+PTX)?$", e)
        fixed.append(m.group(1) + (m.group(2) or "") if m else e)
    fixed = list(dict.fromkeys(fixed))
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(fixed)
    log(f"[ext] TORCH_CUDA_ARCH_LIST {value!r} -> {os.environ['TORCH_CUDA_ARCH_LIST']!r} "
        "(DeepSpeed's op builder cannot read arch suffixes)")


def build_key(name: str, sources: list[Path], flags: list[str], include_dirs: list[Path]) -> str:
    """A short hash of everything the built binary depends on."""
    h = hashlib.sha256()
    parts = [
        name,
        sys.version.split()[0],
        torch.__version__,
        str(torch.version.cuda),
        cuda_arch_list() if any(str(s).endswith(".cu") for s in sources) else "host",
        *flags,
    ]
    for p in parts:
        h.update(p.encode() + b"\0")
    headers = sorted(f for d in include_dirs for f in Path(d).glob("*.h"))
    for f in [*sources, *headers]:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:12]


def build_root(build_dir: str | os.PathLike | None = None) -> Path:
    """Where builds go: build_dir, else $RWKV_WKV_BUILD_DIR, else torch's extensions root."""
    root = build_dir if build_dir is not None else os.environ.get(BUILD_DIR_ENV)
    return Path(root) if root else Path(cpp_extension.get_default_build_root())


@contextmanager
def exclusive_build(directory: Path, log=_stderr) -> Iterator[None]:
    """Hold an fcntl lock on ``<directory>.lock`` for the build; report who holds it while waiting.

    Filesystems without fcntl locks (some Lustre mounts) build without it, as torch alone would.
    """
    lock_path = directory.with_name(directory.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            _acquire(f, lock_path, log)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log(f"[ext] {lock_path}: the filesystem has no fcntl locks ({e.strerror}); building unguarded")
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _acquire(f, lock_path: Path, log) -> None:
    timeout = float(os.environ.get(WAIT_TIMEOUT_ENV, DEFAULT_WAIT_TIMEOUT_S))
    start = last_report = time.monotonic()
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now - start > timeout:
            raise ExtensionBuildError(
                f"{lock_path}: gave up after {timeout:.0f} s waiting for another process's extension build "
                f"({_holder(lock_path)}); raise ${WAIT_TIMEOUT_ENV} or check that process"
            )
        if now - last_report >= (5.0 if last_report == start else 60.0):
            log(f"[ext] waiting for the extension build held by {_holder(lock_path)} ({lock_path})")
            last_report = now
        time.sleep(0.2)


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def remove_stale_torch_lock(directory: Path, log=_stderr) -> bool:
    """Remove torch's lock file from a directory we hold the build lock for: a killed build's leftover."""
    stale = directory / TORCH_LOCK_NAME
    if not stale.exists():
        return False
    log(f"[ext] removing {stale}: a lock left by a build that was killed (no process holds the build lock)")
    stale.unlink(missing_ok=True)
    return True


def build_extension(
    name: str,
    sources: list[Path | str],
    extra_cflags: list[str] | None = None,
    extra_cuda_cflags: list[str] | None = None,
    extra_ldflags: list[str] | None = None,
    build_dir: str | os.PathLike | None = None,
    include_dirs: list[Path] | None = None,
    log=_stderr,
) -> ModuleType:
    """JIT-build and import a torch extension with ninja, once per key, safely shared between processes.

    The module is built in ``<root>/<name>_<key>`` (root: see ``build_root``) and imported under that name.
    Raises ExtensionBuildError with the compiler's output on failure.
    """
    srcs = [Path(s) for s in sources]
    incs = list(include_dirs or [])
    flags = [*(extra_cflags or []), "|", *(extra_cuda_cflags or []), "|", *(extra_ldflags or [])]
    full_name = f"{name}_{build_key(name, srcs, flags, incs)}"
    directory = build_root(build_dir) / full_name
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_build(directory, log):
        remove_stale_torch_lock(directory, log)
        try:
            return cpp_extension.load(
                name=full_name,
                sources=[str(s) for s in srcs],
                extra_cflags=extra_cflags,
                extra_cuda_cflags=extra_cuda_cflags,
                extra_ldflags=extra_ldflags,
                extra_include_paths=[str(d) for d in incs],
                build_directory=str(directory),
                verbose=False,  # keeps the compiler output in the exception instead of on the terminal
            )
        except (RuntimeError, OSError, ImportError) as e:
            (directory / "build.log").write_text(str(e))
            files = ", ".join(str(s) for s in srcs)
            raise ExtensionBuildError(
                f"building the extension {name!r} from {files} in {directory} failed "
                f"(log: {directory / 'build.log'}):\n{e}"
            ) from e


# Built modules, and failed builds (re-raised rather than retried on every call), by configuration.
_LOADED: dict[tuple, ModuleType | ExtensionBuildError] = {}
_LOAD_LOCK = threading.Lock()


def load_kernel(
    name: str,
    src_dir: Path,
    spec: dict,
    build_dir: str | os.PathLike | None = None,
) -> ModuleType:
    """A kernel extension built once per process: `spec` holds its "sources" (file names under
    src_dir, which is also the include directory) and build flags; a failed build is remembered and
    raised again, not retried on every call."""
    key = (name, os.fspath(src_dir), os.fspath(build_dir) if build_dir else None)
    with _LOAD_LOCK:
        if key not in _LOADED:
            spec = dict(spec)
            sources = [src_dir / s for s in spec.pop("sources")]
            try:
                _LOADED[key] = build_extension(
                    name, sources, build_dir=build_dir, include_dirs=[src_dir], **spec
                )
            except ExtensionBuildError as e:
                _LOADED[key] = e
        entry = _LOADED[key]
    if isinstance(entry, ExtensionBuildError):
        raise entry
    return entry


def choose_kernel(
    op: str,
    r: torch.Tensor,
    backend: str,
    kernel_dtypes: dict[str, tuple[torch.dtype, ...]],
    head_size: int,
    load: Callable[[str], ModuleType],
) -> ModuleType | None:
    """The extension a head-wise WKV op (`op`: "wkv6", "wkv7") runs r (B, T, H, N) on, or None for its
    pure-PyTorch reference (only where that is allowed). `load(kind)` builds the "cpu" or "cuda" kind.

    auto: the CUDA kernel on CUDA tensors (a build failure or an unsupported dtype or head size is an
    error: a GPU never falls back to the Python loop), the CPU twin on CPU tensors (falling back to the
    reference with a RuntimeWarning if it cannot be built or does not take the input), the reference
    elsewhere (with a warning). Warnings point at the op's caller.
    """
    title = f"WKV-{op.removeprefix('wkv')}"
    caller = 4  # warn <- choose_kernel <- the op's _kernel_for <- the op <- its caller
    kind = "cuda" if r.is_cuda else ("cpu" if r.device.type == "cpu" else None)
    if backend == "cuda" and kind != "cuda":
        raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got {r.device}")
    if backend == "cpu" and kind != "cpu":
        raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got {r.device}")
    if kind is None:
        warnings.warn(f"{op}: no {title} kernel for {r.device}; using the slow pure-PyTorch reference",
                      RuntimeWarning, stacklevel=caller)
        return None
    problem = None
    if r.dtype not in kernel_dtypes[kind]:
        allowed = ", ".join(str(d).replace("torch.", "") for d in kernel_dtypes[kind])
        problem = f"the {kind} kernel takes {allowed} inputs, got {r.dtype}"
    elif r.shape[-1] != head_size:
        problem = f"the {kind} kernel is built for head size N = {head_size}, got N = {r.shape[-1]}"
    if problem is not None:
        if backend == "auto" and kind == "cpu":
            warnings.warn(f"{op}: {problem}; using the slow pure-PyTorch reference", RuntimeWarning,
                          stacklevel=caller)
            return None
        raise ValueError(f"{op}: {problem}; use backend='reference'")
    try:
        return load(kind)
    except ExtensionBuildError as e:
        if backend != "auto" or kind == "cuda":
            raise
        warnings.warn(f"{op}: using the slow pure-PyTorch reference because {e}", RuntimeWarning,
                      stacklevel=caller)
        return None
