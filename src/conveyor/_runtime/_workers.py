"""Parent side of a process-stage worker."""

from __future__ import annotations

import multiprocessing.spawn
import os
import pickle
import socket
from collections.abc import Callable
from typing import Any

from .._errors import RemoteError, WorkerDiedError, WorkerStartError
from ._proc import ChildProcess, Spawning
from ._wire import (
    ERR,
    OK,
    READY,
    SETUP,
    TASK,
    LinkBroken,
    MsgSocket,
    PeerClosed,
    Undecodable,
)

__all__ = ["ProcWorker", "pickle_function"]


def pickle_function(fn: Callable[..., Any], stage: str) -> bytes:
    """Pickle a stage function for a worker process.

    Raises:
        TypeError: the function cannot be sent (a lambda, a local function...).
    """
    try:
        return pickle.dumps(fn, protocol=5)
    except Exception as exc:
        raise TypeError(
            f"stage {stage!r}: kind='process' needs a picklable function defined at the top "
            f"level of an importable module (got {fn!r}: {exc})"
        ) from exc


def rebuild_error(payload: tuple[Any, str, str, str]) -> tuple[BaseException, str]:
    """The worker's exception (or a RemoteError standing for it) and its traceback text."""
    blob, type_name, message, tb = payload
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message)
    add_note = getattr(exc, "add_note", None)  # Python 3.11+: shown under the exception
    if add_note is not None and tb:
        add_note("The traceback in the worker process:\n" + tb.rstrip())
    return exc, tb


class ProcWorker:
    """One worker process of a process stage, driven by one parent thread.

    Start-up is a handshake under ``timeout``: on failure the child is killed, reaped,
    and WorkerStartError raised.
    """

    def __init__(
        self, fn_blob: bytes, stage: str, timeout: float = 60.0, *, background: bool = False,
        spawning: Spawning | None = None,
    ) -> None:
        self.stage = stage
        self._broken: str | None = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = ChildProcess(
                "conveyor._runtime._child", ["--fd", str(child.fileno())], [child.fileno()],
                spawning,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.link = MsgSocket(parent)
        try:
            self._handshake(parent, fn_blob, stage, timeout, background)
        finally:
            if spawning is not None:  # started, or failed and reaped: not the scope's now
                spawning.discard(self.process)

    def _handshake(self, parent: socket.socket, fn_blob: bytes, stage: str, timeout: float,
                   background: bool) -> None:
        try:
            try:
                os.getcwd()  # the worker starts there, as multiprocessing's do
            except OSError as gone:
                raise WorkerStartError(
                    f"stage {stage!r}: a process stage's workers start in this program's "
                    f"current directory, and it is gone ({gone.strerror}): os.chdir() to "
                    f"one that exists") from gone
            prep = multiprocessing.spawn.get_preparation_data(f"conveyor-{stage}")
            prep.pop("authkey", None)
            parent.settimeout(timeout)
            self.link.send(SETUP, 0, {"prep": prep, "fn": fn_blob, "background": background})
            kind, _, payload, _, _ = self.link.recv()
            if kind == ERR:
                exc, tb = rebuild_error(payload)
                raise WorkerStartError(
                    f"stage {stage!r}: worker failed to start: {exc}\n{tb}"
                ) from exc
            if kind != READY:
                raise WorkerStartError(f"stage {stage!r}: bad handshake from worker")
            parent.settimeout(None)
        except (PeerClosed, OSError) as exc:
            self.close(kill=True)
            raise WorkerStartError(
                f"stage {stage!r}: worker pid {self.process.pid} did not start: {exc} "
                f"({self.process.describe_exit()})"
            ) from exc
        except BaseException:
            self.close(kill=True)
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        """The process has not exited (a non-blocking wait: it is reaped if it has)."""
        return self.process.returncode is None

    def send(self, index: int, value: Any) -> None:
        """Hand the worker one more task (it runs them in order); does not wait.

        At most two tasks may be outstanding (see :mod:`._wire`). Raises PeerClosed or
        OSError if the worker is gone, Unpicklable (nothing sent) for a value that cannot
        be pickled.
        """
        self.link.send(TASK, index, value)

    def receive(self, index: int) -> tuple[bool, Any, str, int, int]:
        """Wait for the answer to the oldest outstanding task (item ``index``).

        Returns ``(ok, result_or_exception, traceback_text, start_ns, end_ns)``; an
        answer that cannot be unpickled here is ``(False, that exception, ...)``.

        Raises:
            WorkerDiedError: the worker died while it held the item (killed, crashed).
        """
        try:
            kind, _, payload, start, end = self.link.recv()
        except LinkBroken as exc:  # the worker may be alive: the link is what failed
            self.break_link(str(exc))
            raise self._died(index) from exc
        except (PeerClosed, OSError) as exc:
            raise self._died(index) from exc
        except Undecodable as bad:
            # Unpickling the answer raised here (the frame was read whole, so the link
            # is still in step): this item's error alone, and the worker goes on.
            cause = bad.__cause__ if isinstance(bad.__cause__, Exception) else bad
            add_note = getattr(cause, "add_note", None)
            if add_note is not None:
                add_note(f"(unpickling the result of item {index} from worker pid "
                         f"{self.pid} of stage {self.stage!r} in the parent)")
            return False, cause, "", 0, 0
        except Exception as exc:
            # The link itself failed on this side (out of descriptors to map the worker's
            # segment...): it cannot be trusted to stay in step, so the worker is stopped
            # and replaced, as if it had died holding the item.
            self.break_link(f"{type(exc).__name__}: {exc}")
            raise self._died(index) from exc
        if kind == OK:
            return True, payload, "", start, end
        err, tb = rebuild_error(payload)
        return False, err, tb, start, end

    def break_link(self, why: str) -> None:
        """The link failed on this side (``why``) and is out of step: stop the worker.
        The next :meth:`receive` reports it, with ``why``."""
        self._broken = why
        self.close(kill=True)

    def _died(self, index: int) -> WorkerDiedError:
        if self._broken is not None:
            return WorkerDiedError(
                f"the link to worker pid {self.pid} of stage {self.stage!r} failed while "
                f"it held item {index}: {self._broken}; the worker was stopped and is "
                f"replaced"
            )
        try:
            self.process.proc.wait(timeout=2.0)
        except Exception:
            pass
        return WorkerDiedError(
            f"worker pid {self.pid} of stage {self.stage!r} died while holding item "
            f"{index}: {self.process.describe_exit()}"
        )

    def close(self, kill: bool = False, timeout: float = 0.5) -> None:
        """Stop the worker: close the link (it exits), wait, then SIGKILL; reaps it."""
        try:
            self.link.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.link.close()
        if kill:
            self.process.kill()
        else:
            self.process.stop(timeout)
