"""Files that hold secrets or money's state (data/dev.json with the demo consumer's key, the
consumer kit's channel state): written so that no other user can read them, even halfway."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (a key, or a channel's state):
    a new file created 0600 in a directory created 0700, then renamed over the old one, so
    it is never in a file others can read, nor in a half-written one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)  # a leftover keeps its own mode: O_EXCL makes a new one
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
