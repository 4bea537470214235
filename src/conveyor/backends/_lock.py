"""One conveyor process per device: an exclusive ``flock`` on a lock file per device.

The lock files live in ``$CONVEYOR_LOCK_DIR`` if set, else ``$XDG_RUNTIME_DIR/conveyor``,
else a private ``/tmp/conveyor-<uid>`` (mode 0700). Each holds the pid of its holder, so a
second opener can be told who has the device.

``flock`` locks belong to the open file, so they die with the process (even on SIGKILL):
there are no stale locks to clean up. Forked children close their inherited copy at once,
so a worker forked by the holder does not keep the device locked after the holder exits.
Locks are per user when ``$XDG_RUNTIME_DIR`` is used; for real devices the ``/proc`` scan
in :mod:`conveyor.backends._discovery` also names holders of other programs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import weakref
from pathlib import Path
from types import TracebackType

from .._errors import DeviceBusyError, DeviceError

__all__ = ["DeviceLock", "acquire_device_lock", "lock_dir", "lock_holder", "read_holder"]

_live: weakref.WeakSet[DeviceLock] = weakref.WeakSet()


def _close_inherited() -> None:
    # In a forked child: drop the child's reference to every lock's open file, so the lock
    # is released when the parent (the real holder) closes or dies.
    for lock in list(_live):
        lock._forget()


os.register_at_fork(after_in_child=_close_inherited)


def lock_dir() -> Path:
    """The directory for conveyor's device lock files, created (mode 0700) if missing.

    Raises:
        DeviceError: the directory cannot be made, or a default one belongs to another
            user (one named by ``CONVEYOR_LOCK_DIR`` is taken as it is).
    """
    explicit = os.environ.get("CONVEYOR_LOCK_DIR")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if explicit:
        path = Path(explicit)
    elif runtime and Path(runtime).is_dir():
        path = Path(runtime) / "conveyor"
    else:
        path = Path(tempfile.gettempdir()) / f"conveyor-{os.getuid()}"
    where = f"the lock directory {path}" + (" (CONVEYOR_LOCK_DIR)" if explicit else "")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # One the user names is theirs to choose (a link to a folder will do); a default
        # one in a shared folder must be a folder of this user's, not a link to another.
        info = path.stat() if explicit else path.lstat()
    except FileExistsError:
        raise DeviceError(f"{where} is a file, not a folder") from None
    except OSError as exc:
        raise DeviceError(f"cannot create {where}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise DeviceError(f"{where} is not a folder; "
                          + ("set another" if explicit else "remove it or set CONVEYOR_LOCK_DIR"))
    if not explicit and info.st_uid != os.getuid():
        raise DeviceError(
            f"{where} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}); "
            f"remove it or set CONVEYOR_LOCK_DIR"
        )
    return path


def read_holder(path: Path) -> int | None:
    """The pid written in a lock file, or None if it is empty or unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_holder(name: str, directory: Path | None = None) -> int | None:
    """The pid holding conveyor's lock ``name``, or None if it is free; takes no lock.

    Reads ``/proc/locks`` (flock entries match the lock file's device and inode), so that
    looking never disturbs an opener. Falls back to the pid written in the file when
    ``/proc/locks`` cannot be read. Never raises.
    """
    try:
        folder = directory if directory is not None else lock_dir()
        info = (folder / f"{name}.lock").stat()
    except (OSError, DeviceError):
        return None
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return read_holder(folder / f"{name}.lock")
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146491 0 EOF" (a "->" marks a waiter)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
            return int(fields[4]) if fields[4].isdigit() else None
    return None


_WORKER_MODULE = "conveyor._device._worker"


def _program_of(pid: int | None) -> tuple[int | None, int | None]:
    """``(program, worker)``: a lock held by a pipeline's device worker process is the
    program's that started it (its parent), and ``worker`` is the worker's pid; else
    ``(pid, None)``."""
    if pid is None:
        return None, None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat_fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return pid, None
    if _WORKER_MODULE.encode() not in command:
        return pid, None
    parent = int(stat_fields[1])  # after the name: state, ppid, ...
    return (parent, pid) if parent > 1 else (pid, None)


def _command(pid: int) -> str:
    """A process's command line, short, for a message: file names without their folders
    ("python3 cam.py"; "?" when it cannot be read)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(os.path.basename(w.decode(errors="replace")) or w.decode(errors="replace")
                    for w in words if w)
    return (text[:77] + "...") if len(text) > 80 else text or "?"


class DeviceLock:
    """An exclusive lock on one device, held until :meth:`release` or process exit.

    Use as a context manager or call :meth:`release`; releasing twice is harmless.
    """

    def __init__(self, name: str, path: Path, fd: int) -> None:
        self.name = name
        self.path = path
        self._fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        _live.add(self)

    @property
    def held(self) -> bool:
        """True until released."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (closes the lock file). Never blocks."""
        self._fd = None
        self._finalizer()

    def _forget(self) -> None:
        self.release()

    def __enter__(self) -> DeviceLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DeviceLock({self.name!r}, held={self.held})"


def acquire_device_lock(name: str, what: str, directory: Path | None = None) -> DeviceLock:
    """Take the exclusive lock ``<dir>/<name>.lock`` for the device described as ``what``.

    Never blocks: if another process (or another open in this process) holds the lock, it
    fails at once.

    Raises:
        DeviceBusyError: the lock is held; the message names the holder's pid and says to
            share the device through ``conveyor serve``.
        DeviceError: the lock file cannot be created.
    """
    folder = directory if directory is not None else lock_dir()
    path = folder / f"{name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DeviceError(f"cannot open the lock file {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DeviceError(f"cannot lock {path}: {exc}") from exc
        # /proc/locks names the holder even before it has written its pid in the file.
        pid = lock_holder(name, folder) or read_holder(path)
        program, worker = _program_of(pid)
        if program is not None and program == _program_of(os.getpid())[0]:
            # (This process may be a device worker itself: its program is its parent.)
            by = "" if worker is None else f": a pipeline's device worker (pid {worker}) holds it"
            raise DeviceBusyError(
                f"{what} is already open in this program (pid {program}){by} (lock {path}): "
                f"open each device once (is it listed twice, or still open from before? two "
                f"inference stages of one pipeline on it share one worker) and share that "
                f"one between its users"
            ) from None
        holder = ("another conveyor process" if program is None
                  else f"conveyor process {program} ({_command(program)})" if worker is None
                  else f"conveyor process {program} ({_command(program)}), through its "
                       f"device worker {worker}")
        raise DeviceBusyError(
            f"{what} is in use by {holder} (lock {path}); a device serves one process at "
            f"a time: share it by running `conveyor serve` and connecting to the server, or "
            f"close the other program"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DeviceLock(name, path, fd)
