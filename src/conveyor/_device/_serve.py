"""``conveyor serve``: the listening socket, signals and metrics around a DeviceServer.

The socket:

- its path defaults to :func:`~conveyor._device._client.default_socket_path`; a missing
  parent directory is created with mode 0700 (0750 and the group with ``group``);
- it is created with mode 0600, or 0660 owned by ``group`` (whose members are then
  allowed: SO_PEERCRED is checked on every connection in any case);
- if another server answers at the path, this one refuses to start; a socket file nobody
  answers on (left by a server that was killed) is removed;
- it is removed when the server exits.

Signals: the first SIGTERM or SIGINT drains (queued and running requests finish and are
answered, new ones are refused) and exits; a second one exits at once.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import resource
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .._errors import ServerError
from .._runtime._proc import on_eof
from ._client import default_socket_path, not_private, private_tmp_dir
from ._server import DeviceServer

__all__ = ["bind_socket", "check_socket_path", "resolve_group", "resolve_user", "serve"]

log = logging.getLogger("conveyor.server")


#: The largest uid or gid (2**32 - 2: -1 means "none" to chown).
_MAX_ID = 2**32 - 2


def _numeric_id(text: str, what: str) -> int:
    value = int(text)
    if value > _MAX_ID:
        raise ValueError(f"{what} {text} is out of range (at most {_MAX_ID})")
    return value


def resolve_user(user: str) -> int:
    """A user name or numeric uid as a uid. Raises ValueError for an unknown name."""
    if user.isascii() and user.isdigit():
        return _numeric_id(user, "uid")
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"no user named {user!r}") from None


def resolve_group(group: str) -> int:
    """A group name or numeric gid as a gid. Raises ValueError for an unknown name."""
    if group.isascii() and group.isdigit():
        return _numeric_id(group, "gid")
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no group named {group!r}") from None


def _prepare_dir(directory: Path, gid: int | None, others: bool = False) -> list[Path]:
    """Make the socket's folder if need be, its missing parents too, each 0700, 0750 with
    a group, 0711 when other users are allowed (they may enter it, not list it); the
    folders made, outermost first. Warns if those let in cannot reach an existing one."""
    # Anyone could have made the default folder first (a dangling link too, which
    # exists() below does not see).
    if directory == private_tmp_dir():
        why = not_private(directory)
        if why is not None:
            raise ServerError(why)
    if not directory.exists():
        missing = [d for d in (directory, *directory.parents) if not d.exists()][::-1]
        made: list[Path] = []
        try:
            for folder in missing:
                folder.mkdir(mode=0o700)
                made.append(folder)
                if gid is not None:
                    _give_to_group(folder, gid)
                if others:
                    os.chmod(folder, 0o711)
                elif gid is not None:
                    os.chmod(folder, 0o750)
        except BaseException:
            _remove_dirs(made)
            raise
        return made
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise ServerError(f"{directory} is not a directory")
    if directory == private_tmp_dir() and (gid is not None or others):
        # This user's own folder, left by an earlier server (0700): opened as far as those
        # let in need (they were refused with advice to pass what had been passed).
        if gid is not None and info.st_gid != gid:
            _give_to_group(directory, gid)
        mode = stat.S_IMODE(info.st_mode) | (0o011 if others else 0) | (
            0o050 if gid is not None else 0)
        if mode != stat.S_IMODE(info.st_mode):
            os.chmod(directory, mode)
        info = directory.stat()
    if gid is not None and not info.st_mode & (stat.S_IXGRP | stat.S_IXOTH):
        log.warning("members of group %d cannot reach %s (mode %o); pass --socket in a "
                    "directory they can enter", gid, directory, stat.S_IMODE(info.st_mode))
    if others and not info.st_mode & stat.S_IXOTH:
        log.warning("the users allowed cannot reach %s (mode %o); pass --socket in a "
                    "directory they can enter", directory, stat.S_IMODE(info.st_mode))
    return []


def _give_to_group(path: Path, gid: int) -> None:
    """chown ``path`` to group ``gid``. Raises ServerError saying why it may not."""
    try:
        os.chown(path, -1, gid)
    except PermissionError as exc:
        raise ServerError(f"cannot give {path} to group {gid}: {exc.strerror} (is this "
                          f"user a member of that group?)") from exc


def _remove_dirs(made: list[Path]) -> None:
    """Remove the folders :func:`_prepare_dir` made, innermost first, where still empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def check_socket_path(path: Path) -> None:
    """Refuse ``path`` if a live server answers there; remove a stale socket file.

    Blocks for one connection attempt (at most a second).

    Raises:
        ServerError: another server answers, or the path is not a socket.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ServerError(f"{path} exists and is not a socket; remove it or pass another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing the stale socket %s (its server is gone)", path)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return
    except OSError as exc:
        raise ServerError(f"cannot check {path}: {exc}") from exc
    finally:
        probe.close()
    raise ServerError(f"another server is already serving at {path}; stop it first "
                      f"(`conveyor status --socket {path}` shows it)")


def bind_socket(path: Path, gid: int | None = None, backlog: int = 128,
                others: bool = False) -> socket.socket:
    """A listening Unix socket at ``path``: mode 0600, 0660 with group ``gid``, or 0666
    when ``others`` (some other users are allowed: the server's peer-credential check,
    not the file mode, then decides who gets in).

    The socket is created under a restrictive umask, so it is never reachable by others,
    not even between bind and chmod. Raises OSError.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        why = f"cannot listen on {path}: {exc.strerror or exc}"
        # (no errno for "AF_UNIX path too long": "[Errno None]" otherwise)
        raise (OSError(exc.errno, why) if exc.errno else OSError(why)) from exc
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    try:
        if gid is not None:
            _give_to_group(path, gid)
        os.chmod(path, 0o666 if others else 0o660 if gid is not None else 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock


class _Signals:
    """SIGTERM/SIGINT: the first drains, the second stops at once."""

    def __init__(self, server: DeviceServer) -> None:
        self.server = server
        self.count = 0
        self._first = (0, 0.0)  # the first signal and when it came
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.count == 1 and self._first[0] == signum and now - self._first[1] < 0.2:
            # The same signal again at once is one request sent twice: timeout(1) sends
            # one to the process and one to its group (it stopped at once 2-3 runs in 5).
            return
        if not self.count:
            self._first = (signum, now)
        self.count += 1
        # Only flags and a pipe write here: the handler may run in the middle of anything.
        self.server.request_stop(drain=self.count == 1)

    def restore(self) -> None:
        """Put the handlers back; after a stop by signal, ignore both instead: the
        process is on its way out, and a second one sent a moment later (timeout(1)
        sends one to the process and one to its group) must not kill it half-way."""
        for sig, handler in self._old.items():
            signal.signal(sig, signal.SIG_IGN if self.count else handler)
        self._old.clear()


def _watch_for_eof(fd: int, server: DeviceServer) -> None:
    """Stop ``server`` (draining) once ``fd`` reads end of file."""

    def stop() -> None:
        log.info("stopping: the program that started this server has gone")
        server.request_stop(drain=True)

    on_eof(fd, stop, "conveyor-stop-on-eof")


def _raise_descriptor_limit() -> None:
    """Raise the soft limit on open descriptors to the hard one. Each client takes a
    connection and its shared memory, and up to 20 descriptors may wait for their segment
    on a connection: at the usual soft limit of 1024, one user's 56 connections left
    none for anyone else, the server's owner included."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            log.debug("could not raise the descriptor limit from %d: %s", soft, exc)
        else:
            log.debug("descriptor limit raised from %d to %d", soft, want)


def serve(
    *,
    socket_path: str | os.PathLike[str] | None = None,
    devices: Sequence[str] = ("cpu",),
    models: Sequence[str] = ("face_detection_short_range",),
    group: str | None = None,
    allow_users: Sequence[str] = (),
    max_queue: int = 256,
    max_inflight: int = 32,
    max_clients: int = 256,
    metrics_port: int | None = None,
    ready: Callable[[Path], None] | None = None,
    realtime: int = 0,
    stop_on_eof: int | None = None,
) -> int:
    """Open the devices, load the models, and serve until SIGTERM or SIGINT.

    Blocks until the server stops. ``ready`` is called once the socket accepts clients.
    ``realtime``: a SCHED_FIFO priority for the device threads (see :class:`DeviceServer`).
    ``stop_on_eof``: a descriptor (a pipe from the program that started this one, such as
    standard input): its end of file stops the server as SIGTERM does, so that it never
    outlives that program, however it ends.
    Returns 0 after a drained stop, 1 after a forced one (a second signal). After a stop
    by signal, SIGTERM and SIGINT are left ignored: the caller is expected to exit.

    Raises:
        ServerError: another server answers at the path, or the path is unusable.
        ValueError: an unknown user or group.
        DeviceError, ModelError: a device or model could not be opened.
        OSError: the socket or the metrics port could not be bound.
    """
    from ..backends import open_device

    _raise_descriptor_limit()
    path = Path(socket_path) if socket_path is not None else default_socket_path()
    path = path.absolute()
    gid = resolve_group(group) if group is not None else None
    uids = [resolve_user(u) for u in allow_users]
    made = _prepare_dir(path.parent, gid, others=bool(uids))
    opened = []
    try:
        check_socket_path(path)
        try:
            for spec in devices:
                opened.append(open_device(spec))
        except BaseException:
            for device in opened:
                device.close()
            raise
        server = DeviceServer(  # (closes the devices if it fails)
            opened, list(models), max_queue=max_queue, max_inflight=max_inflight,
            max_clients=max_clients,
            allowed_uids=uids, allowed_gids=[] if gid is None else [gid], realtime=realtime,
        )
    except BaseException:
        _remove_dirs(made)  # a server that never started leaves no folder behind
        raise
    metrics = None
    listener = None
    signals = _Signals(server)
    ino = None
    served = False
    try:
        check_socket_path(path)  # loading took a while: check again just before binding
        listener = bind_socket(path, gid, others=bool(uids))
        info = path.lstat()
        ino = (info.st_dev, info.st_ino)
        server.add_listener(listener)
        server.socket_path = str(path)
        if metrics_port is not None:
            from ._metrics import MetricsServer

            try:
                metrics = MetricsServer(server.status, metrics_port)
            except OSError as exc:
                raise OSError(exc.errno, f"metrics port 127.0.0.1:{metrics_port}: "
                              f"{exc.strerror or exc}") from exc
            log.info("metrics on http://%s:%d/metrics", metrics.host, metrics.port)
        signals.install()
        if stop_on_eof is not None:
            _watch_for_eof(stop_on_eof, server)
        log.info("serving %s on %s (pid %d)", ", ".join(models),
                 ", ".join(f"{d.spec} (simulation)" if d.simulated else str(d.spec)
                           for d in opened), os.getpid())
        for d in opened:  # where `auto` runs each model, and why
            for model, (where, why) in sorted(getattr(d, "choices", {}).items()):
                log.info("%s runs %s on %s: %s", d.spec, model, where, why)
        if ready is not None:
            ready(path)
        served = True
        server.serve_forever()
    finally:
        if metrics is not None:
            metrics.close()
        if ino is not None:
            try:
                info = path.lstat()
                if (info.st_dev, info.st_ino) == ino:
                    path.unlink()
            except FileNotFoundError:
                pass
        server.close()  # only does something if serve_forever never ran
        signals.restore()  # only now: a second signal until here is ours, not fatal
        if not served:  # a server that never started leaves no folder behind
            _remove_dirs(made)
    forced = signals.count > 1 or server._stop_seen == 2
    if not server.devices_idle():
        # A device is stuck in a request: nothing left to wait for, and joining it
        # could take forever. Everything that matters is closed and removed.
        log.warning("exiting with a device still busy")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    log.info("stopped%s", " at once" if forced else " after draining")
    return 1 if forced else 0
