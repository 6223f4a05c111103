"""Small file helpers shared by the caches."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file of this process and thread, then rename it into place: a reader
    sees the old file or the whole new one, and two writers of the same path (processes sharing a cache directory,
    threads of one server) never mix their bytes. Raises OSError like `Path.write_text`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
