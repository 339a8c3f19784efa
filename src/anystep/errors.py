"""The one error path of the command line.

Every failure the user caused or can fix (a bad value, a bad file or folder, a full disk, a
read-only target, a diverging run, Ctrl-C) ends in one line ``anystep: error: ...`` on stderr
saying what was wrong and what to do, exit code 2 (130 for Ctrl-C). Anything else is a bug and
keeps its traceback (exit code 1).

The toolkit's own error classes (config, checkpoint, shard, model folder, export) derive from
:class:`UserError`, so the command line catches them in one place.
"""

from __future__ import annotations

import errno

EXIT_USER = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input or environment: reported in one line, exit code 2."""


# OS errors that say something about the user's disk or permissions, not about our code.
_USER_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def os_error_line(e: OSError) -> str | None:
    """One line for an OS error the user can fix, or None for one that is a bug."""
    what = _USER_ERRNOS.get(e.errno)
    if what is None:
        return None
    where = e.filename if e.filename is not None else ""
    hint = "free some space and run the command again" if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
        "choose a place you can write to"
    return f"{what}{f' writing {where}' if where else ''}: {hint}; files written before are kept as they were"


def message_line(e: BaseException) -> str:
    """``anystep: error: <first line of the message>``."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first if first.startswith("anystep") else f"anystep: error: {first}"


def disk_full_line(e: BaseException) -> str | None:
    """Libraries that write for us (safetensors, the checkpoint writer) wrap a full disk in their
    own exception types; their text still says what happened."""
    text = str(e)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return os_error_line(OSError(errno.ENOSPC, "No space left on device"))
    return None
