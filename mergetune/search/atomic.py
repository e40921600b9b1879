"""Files of a run folder written whole or not at all, and a full disk reported with its path and size.

A result file written in place and cut by a kill or a full disk is left truncated, and a reader
then fails on it (or, worse, reads half a table). ``write_atomic`` writes a temporary file in the
same folder, syncs it and renames it over the target: a reader sees the old file or the new one.

A failed ``write()`` raises an ``OSError`` without a file name; the CLI prints an ``OSError`` as one
line naming its path (``errors.describe_os_error``), so ``located`` adds the path, and for a full
disk how many bytes the failed write needed and how many were free.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` by ``data`` (text is UTF-8): never a half-written file, even on a kill or a full disk."""
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the rename stays on one file system
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # a full disk must not keep the partial copy's space
        raise located(exc, path, len(payload)) from exc


def located(exc: OSError, path: Path | str, size: int) -> OSError:
    """``exc`` with the path it failed on; for a full disk, the bytes the write needed and those free."""
    if exc.errno != errno.ENOSPC:
        return exc if exc.filename is not None else OSError(exc.errno, exc.strerror, str(path))
    free = _free_bytes(Path(path).parent)
    detail = f"{size} bytes to write, {'unknown' if free is None else free} bytes free"
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {detail}", str(path))


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
