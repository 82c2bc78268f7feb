"""Writing files safely, and where the repository is: a leaf module (imports nothing of the project), so any
module may use it."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Any, Iterable, Sequence

# The repository's root folder (the parent of utils/): recipes, the default dataset and run folders live here.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_folder(parent: str, prefix: str) -> str:
    """A new empty folder in ``parent`` to build an output in before renaming it into place, with the permissions
    a plain os.makedirs would give (mkdtemp makes it private, 0700, which the renamed output would keep)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o777 & ~_umask())
    return path


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
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8, newlines as given: CSV text keeps its ``\\r\\n``)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, doc: Any, indent: int = 2) -> None:
    """Write ``doc`` as indented JSON plus a final newline, atomically."""
    write_text(path, json.dumps(doc, indent=indent) + "\n")


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any] | dict[str, Any]], lineterminator: str = "\r\n") -> str:
    """CSV text of ``rows`` (lists in ``header`` order, or dicts keyed by it; missing keys are empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=lineterminator)
    w.writerow(header)
    for r in rows:
        w.writerow([r.get(h, "") for h in header] if isinstance(r, dict) else r)
    return buf.getvalue()
