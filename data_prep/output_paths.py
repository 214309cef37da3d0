"""Check, before any work starts, that a command's outputs can be written where they are asked to go.

Every CLI (data_prep, its merge, train_tokenizer, train, launch.convert, launch.generate) calls
these first, so a bad output path costs one line and exit status 2 instead of a traceback after
minutes of tokenizing, loading or DeepSpeed start-up. Permission bits alone cannot tell (root
ignores them; /proc and read-only mounts refuse anyway), so the directory is really created and a
probe file really written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the path and what was to be written."""


def _missing_dirs(path: Path) -> list[Path]:
    """The directories `mkdir(parents=True)` would create for `path`, outermost first."""
    missing = []
    for p in [path, *path.parents]:
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing[::-1]


def _reason(e: OSError, path: Path) -> str:
    where = f" ({e.filename})" if e.filename and Path(e.filename) != path else ""
    return f"{e.strerror or e}{where}"


def check_writable_dir(path: str | os.PathLike, what: str, keep_created: bool = False) -> Path:
    """Make sure files can be created in directory `path` (creating it, as the command would).

    Directories created here are removed again unless `keep_created` (several processes checking
    the same directory at once must keep it: one's cleanup would break another's probe).
    """
    path = Path(path)
    _probe_dir(path, what, path, keep_created)
    return path


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Make sure file `path` can be written: not a directory, and its directory is writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write {what} to {path}: it is a directory")
    _probe_dir(path.parent, what, path, keep_created=False)
    return path


def _probe_dir(path: Path, what: str, shown: Path, keep_created: bool) -> None:
    """Create `path` if needed and write a probe file in it; errors name `shown`."""
    created = _missing_dirs(path)
    existing = created[0].parent if created else path
    if not existing.is_dir():
        raise OutputPathError(f"cannot write {what} to {shown}: {existing} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write {what} to {shown}: {_reason(e, shown)}") from None
    finally:
        if not keep_created:
            for d in reversed(created):
                try:
                    d.rmdir()
                except OSError:
                    break
