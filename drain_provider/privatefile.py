"""Files that hold secrets or money's state (data/dev.json with the demo consumer's key, the
consumer kit's channel state, the provider's keystore and its password file, ledger backups):
written so that no other user can read them, even halfway."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _write_temporary(path: Path, text: str) -> Path:
    """`text` in a new file beside `path`, created 0600 in a directory created 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)  # a leftover keeps its own mode: O_EXCL makes a new one
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (a key, or a channel's state):
    a new file created 0600 in a directory created 0700, then renamed over the old one, so
    it is never in a file others can read, nor in a half-written one."""
    temporary = _write_temporary(path, text)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def create_private(path: Path, text: str) -> None:
    """Like `write_private`, for a file that must not replace another (a new key, a password):
    linked into place, which fails with FileExistsError when `path` exists, even if it appeared
    a moment ago."""
    temporary = _write_temporary(path, text)
    try:
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def exposed(file: Path | int) -> bool:
    """Whether users other than the owner have any access to `file` (a path, or an open file's
    descriptor): a secret there is not secret. Always False on Windows, whose mode bits say
    nothing of it."""
    mode = os.fstat(file).st_mode if isinstance(file, int) else file.stat().st_mode
    return os.name != "nt" and bool(stat.S_IMODE(mode) & 0o077)
