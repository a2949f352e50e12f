"""Which worker errors are deterministic: the same inputs fail the same way on every retry.

    why = deterministic(exc)     # a one-line reason, or None for an error worth retrying

A full disk, a read-only or over-quota store, a corrupt or missing dataset file, a wrong
value: retrying from the latest checkpoint meets the same error, so each retry only burns
time (and, for a full disk, may half-write another checkpoint). The worker loop records the
reason with the run's schedule actor and the restarted workers stop at once; the driver then
ends the run with that reason. A lost node, a killed process, an injected fault or a NaN are
not deterministic: Ray Train retries those up to run.max_failures.
"""

from __future__ import annotations

import errno

# errnos of a store that will not take the write however often it is retried
_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system"}


def deterministic(exc: BaseException) -> str | None:
    """A one-line reason when `exc` (or what it was raised from) will recur on a retry."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        why = _one(exc)
        if why is not None:
            return why
        exc = exc.__cause__ or exc.__context__
    return None


def _one(exc: BaseException) -> str | None:
    text = " ".join(str(exc).split())[:400]
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return f"{_NO_SPACE[exc.errno]}{where}: {text}"
    if "No space left on device" in text:  # torch.save and pyarrow wrap the OSError
        return f"no space left on the device: {text}"
    if type(exc).__name__ in ("ArrowInvalid", "ArrowTypeError") or "Parquet" in type(exc).__name__:
        return f"corrupt data: {text}"
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError)):
        return f"{type(exc).__name__}: {text}"
    return None
