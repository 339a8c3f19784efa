"""Writing without destroying anything of the user's.

Three rules every writer in the toolkit follows:

* **Ownership.** We write into a folder only when it is missing, empty, or carries our marker
  file (``.anystep``, written into every run, model and clip folder we make). A foreign folder
  is refused with its path, never emptied or replaced.
* **Atomicity.** Every file and folder appears only complete: written under a temporary name
  beside its destination, checked, then renamed. An interrupted or failed write leaves the
  previous version in place.
* **Umask.** ``tempfile`` creates 0600 files and 0700 folders; what we rename into place gets
  the mode an ordinary ``open`` / ``mkdir`` would have given it.

Overwrite policy for command-line outputs (``--out``): a file that exists (including the ``.png``
written beside a clip) is refused unless ``--overwrite`` is given; a folder that exists and is
not empty is replaced only with ``--overwrite`` *and* only if it carries our marker of the same
kind. Resumable outputs (training runs, eval, synth, encode, reproduce) continue in a folder
that is theirs instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from anystep.errors import UserError

MARKER = ".anystep"
LOCK = ".anystep.lock"


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (threads may be writing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path, is_dir: bool | None = None) -> None:
    """Give a file or folder made by ``tempfile`` the mode ``open`` / ``mkdir`` would have."""
    path = Path(path)
    if is_dir is None:
        is_dir = path.is_dir()
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def apply_umask_tree(root) -> None:
    root = Path(root)
    apply_umask(root, True)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            apply_umask(Path(dirpath) / d, True)
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                apply_umask(p, False)


def read_marker(folder) -> dict | None:
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder, kind: str, **extra) -> None:
    path = Path(folder) / MARKER
    path.write_text(json.dumps({"kind": kind, **extra}) + "\n")
    apply_umask(path, False)


def has_entries(folder) -> bool:
    """Whether a folder holds anything besides our own lock and marker files."""
    return any(p.name not in (LOCK, MARKER) for p in Path(folder).iterdir())


def is_empty_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and not any(path.iterdir())


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing ancestor of ``path``: the folder in which it would be created."""
    p = path.absolute().parent
    while not p.exists():
        p = p.parent
    return p


def check_parent_writable(path, what: str = "--out") -> None:
    """Refuse before any work when ``path`` could not be created (read-only file system, no
    permission, or a file standing where a parent folder must go)."""
    path = Path(path)
    anc = _writable_ancestor(path)
    if not anc.is_dir():
        raise UserError(f"{what} {path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot write in {anc} (read-only or no permission); choose another {what}")


def check_out_file(path, overwrite: bool, what: str = "--out") -> None:
    """An output file: refuse a folder in its place, and an existing file unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; name a file")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it, or choose another {what}")
    check_parent_writable(path, what)


def check_out_folder(path, kind: str, overwrite: bool = False, resumable: bool = False, what: str = "--out") -> None:
    """An output folder: missing or empty is fine; ours (marker of ``kind``) is fine when the
    command continues in it (``resumable``) or replaces it (``overwrite``); anything else is
    refused with the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a folder; choose another {what}")
    if path.is_dir() and has_entries(path):
        marker = read_marker(path)
        if marker is None:
            raise UserError(f"{what} {path} is a non-empty folder not written by anystep; it is left as it is: "
                            f"choose a new or empty {what}")
        if marker.get("kind") != kind:
            raise UserError(f"{what} {path} is an anystep {marker.get('kind')} folder, not a {kind} folder; it is left "
                            f"as it is: choose a new or empty {what}")
        if not (resumable or overwrite):
            raise UserError(f"{path} already exists; pass --overwrite to replace it, or choose another {what}")
    check_parent_writable(path / "x", what)


def atomic_file(path, write, check=None) -> Path:
    """``write(tmp_path)`` under a temporary name beside ``path`` (writers such as ffmpeg want a
    path, not a file object), ``check(tmp_path)`` if given, fsync, umask, rename."""
    return atomic_files([(path, write, check)])[0]


def atomic_files(items) -> list[Path]:
    """Several files that belong together (a clip and its frame grid): all are written and checked
    under temporary names first, then renamed one after the other, so a failure in any of them
    leaves every previous version in place."""
    done: list[tuple[str, Path]] = []
    try:
        for path, write, check in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
            os.close(fd)
            done.append((tmp, path))
            write(tmp)
            if check is not None:
                check(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            apply_umask(tmp, False)
        for tmp, path in done:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in done:
            _unlink_quietly(tmp)
        raise
    return [path for _, path in done]


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def temp_folder_beside(dest) -> Path:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))


def swap_folder_in(tmp, dest) -> None:
    """Rename a finished folder over ``dest`` (which, if it exists, the caller has checked is ours)."""
    tmp, dest = Path(tmp), Path(dest)
    apply_umask_tree(tmp)
    old = None
    if dest.exists():
        # A unique empty folder: rename(2) may replace it, and no file of the user's is in the way.
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write, binary: bool = True) -> Path:
    """Write through ``write(file_object)``; the file appears only complete (:func:`atomic_file`:
    written beside, fsynced, renamed), so a reader or a crash never sees half of it."""

    def through_file(tmp):
        with open(tmp, "wb" if binary else "w") as f:
            write(f)

    return atomic_file(path, through_file)


def atomic_save_folder(write_fn, dest: str | os.PathLike, kind: str | None = None) -> None:
    """Build a folder with ``write_fn(tmpdir)`` next to ``dest`` and swap it in by rename.

    A crash leaves either the old folder or the new one, never a mix. ``kind`` marks the folder
    as ours (:func:`write_marker`); an existing ``dest`` is replaced only when it is empty, ours,
    or a model folder (``model_index.json``) -- never a file or a foreign folder.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a folder; it is left as it is: choose another destination")
    if dest.is_dir() and any(dest.iterdir()) and read_marker(dest) is None and not (dest / "model_index.json").is_file():
        raise UserError(f"{dest} is a non-empty folder not written by anystep; it is left as it is: choose another destination")
    tmp = temp_folder_beside(dest)
    try:
        write_fn(tmp)
        if kind is not None:
            write_marker(tmp, kind)
        swap_folder_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def take_lock(folder, what: str = "--out") -> Path:
    """Create ``folder/.anystep.lock`` holding our PID, or refuse in one line while a live process
    holds it. The lock of a process that no longer exists (killed, crashed) is taken over."""
    folder = Path(folder)
    lock = folder / LOCK
    host = socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
                pid, where = int(held["pid"]), held.get("host")
            except (OSError, ValueError, KeyError, TypeError):
                # Just created and not yet written, or damaged: held unless it has been like that a while.
                try:
                    young = time.time() - lock.stat().st_mtime < 30
                except FileNotFoundError:
                    continue
                if young:
                    raise UserError(f"{folder} is being written by another process (lock {lock}); wait for it to "
                                    f"finish or use another {what}") from None
                pid, where = None, None
            if pid is not None and (where not in (None, host) or _pid_alive(pid)):
                on = f" on {where}" if where not in (None, host) else ""
                raise UserError(f"{folder} is being written by another run (PID {pid}{on}); wait for it to finish, "
                                f"or use another {what}; if that process is gone, delete {lock}") from None
            lock.unlink(missing_ok=True)  # a dead run's lock
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": host}) + "\n")
        return lock
    raise UserError(f"{folder}: another process took the lock {lock} at the same moment; run the command again")


def release_lock(lock) -> None:
    lock = Path(lock)
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def folder_lock(folder, what: str = "--out"):
    """Hold the folder's lock for the duration of a command. A folder it had to create and that
    is still empty afterwards (the command refused) is removed again."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = take_lock(folder, what)
    try:
        yield lock
    finally:
        release_lock(lock)
        if created and is_empty_dir(folder):
            folder.rmdir()


def folder_digest(folder) -> str:
    """sha256 over a model folder's files (relative names and bytes): identifies the weights a
    job was trained from, where the path alone would not notice a retrained teacher."""
    h = hashlib.sha256()
    root = Path(folder)
    # The model card is documentation: writing or rewording it does not make another teacher.
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.relative_to(root) != Path("README.md")):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
