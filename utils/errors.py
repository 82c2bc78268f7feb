"""The one exception type for mistakes a user can make, and the wrapper that prints it on one line."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad path, wrong file, bad config). The message names the fix."""


def run_main(main: Callable[[], object]) -> None:
    """Run a script's ``main()``; a ``UserError`` becomes ``error: <message>`` on stderr and exit status 2.

    Anything else is a bug in this repository and keeps its traceback.
    """
    try:
        main()
    except UserError as e:
        msg = " ".join(str(e).split("\n"))
        sys.stderr.write(f"error: {msg}\n")  # one write: under torchrun every process may print the same line
        sys.stderr.flush()
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        print("error: out of memory (" + str(e).splitlines()[0][:200] + "); lower --batch-size or --img-size, "
              "use fewer --workers, or --set cache=none for large image folders", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _is_out_of_memory(e: BaseException) -> bool:
    """True for host or GPU allocation failures (torch.OutOfMemoryError is a RuntimeError)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def torch_load_problem(path: str, e: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words that fit a one-line error. torch's own text
    advises ``weights_only=False``, which would let the file run code: never shown to the user."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save writes a zip; old torch a pickle
        return "not a PyTorch file (an ONNX model, an image or another format?)"
    text = str(e)
    if "Unsupported global" in text or "unsupported GLOBAL" in text:
        return ("it holds pickled Python objects (a whole model saved with torch.save(model)?), which are never "
                "loaded because unpickling can run code; save model.state_dict() instead")
    if "central directory" in text or "failed reading zip archive" in text or "file read failed" in text:
        # a zip cut short (a copy or download that stopped, a disk that filled while saving)
        return "incomplete or damaged: the file ends before its index; copy it again, or take last.pt / best.pt"
    first = text.splitlines()[0] if text else type(e).__name__
    if first.startswith("Weights only load failed"):
        return "a PyTorch file whose content cannot be loaded safely (weights_only)"
    return first[:200]
