"""Writing a file so that no reader ever sees half of it: a temporary file beside it, flushed to
disk, then renamed over it. What the store's card files, certificates and token files use."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, private: bool = False) -> None:
    """Write `data` to `path` in one step (`private`: readable by the owner only, 0600).
    OSError leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
