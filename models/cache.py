"""The user's cache folder for what artstyle computes once per machine, and safe writes to it.

Everything here can be recomputed, so a cache that cannot be written only costs time.
`ARTSTYLE_CACHE_DIR` moves it (tests, read-only homes); else `$XDG_CACHE_HOME/artstyle`,
else `~/.cache/artstyle`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_DIR_VARIABLE = "ARTSTYLE_CACHE_DIR"


def cache_dir() -> Path:
    if CACHE_DIR_VARIABLE in os.environ:
        return Path(os.environ[CACHE_DIR_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "artstyle"


def write_atomically(path: Path, data: bytes) -> None:
    """Writes a temporary file beside `path` and renames it over `path`: a reader (another
    worker on the same machine) sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
