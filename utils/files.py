"""Writing files safely: a leaf module (imports nothing of the project), so any module may use it."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` on a temp file in ``path``'s folder, fsync it, then ``os.replace`` it.

    A crash or Ctrl-C mid-write leaves the previous file intact, never a half-written one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
