"""A pipeline's private device worker: a child process running a DeviceServer on one
pre-connected socket. ``python -m conveyor._device._worker --fd N --device SPEC --model M``.

It is the device server with no listening socket: the same scheduler, the same protocol.
If loading fails, it answers the client's HELLO with an ERROR naming the conveyor error
class, so the parent re-raises the same typed error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence

from .._errors import ConveyorError, WorkerStartError
from .._runtime._proc import ChildProcess, Spawning, watch_lifeline
from ._client import DeviceClient
from ._protocol import FrameReader, MsgType, encode

__all__ = ["DeviceWorker", "main"]


class DeviceWorker:
    """Parent side: spawn the worker process and connect a :class:`DeviceClient` to it.

    The client's handshake is the start-up handshake, under ``timeout``; on any failure
    the child is killed and reaped and the error raised (the worker's own typed error,
    or WorkerStartError). ``realtime``: the device thread's SCHED_FIFO priority (0: none;
    see :class:`DeviceServer`); the policy in force is in ``client.welcome["devices"]``.
    ``reader``: the client's own thread reads every reply (see :class:`DeviceClient`; on
    by default, as a pipeline uses the worker through futures).

    ``connections``: how many clients (``clients``; ``client`` is the first) the worker
    serves, each on a connection of its own with its own reader thread and credit, as
    clients of a server are: the inference stages that share one device each have one,
    so that one stage's reply, waiting for room in the next stage, never holds up the
    other's.
    """

    def __init__(
        self, device: str, models: Sequence[str], *, timeout: float = 60.0,
        max_inflight: int = 8, realtime: int = 0, reader: bool = True, connections: int = 1,
        spawning: Spawning | None = None,
    ) -> None:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                 for _ in range(max(connections, 1))]
        args = ["--device", device, "--max-inflight", str(max_inflight),
                "--realtime", str(realtime)]
        for _, child in pairs:
            args += ["--fd", str(child.fileno())]
        for m in models:
            args += ["--model", str(m)]
        try:
            self.process = ChildProcess("conveyor._device._worker", args,
                                        [child.fileno() for _, child in pairs], spawning)
        except BaseException:
            for parent, _ in pairs:
                parent.close()
            raise
        finally:
            for _, child in pairs:
                child.close()
        self.clients: list[DeviceClient] = []
        try:
            self._handshake(device, pairs, timeout, reader)
        finally:
            if spawning is not None:  # started, or failed and reaped: not the scope's now
                spawning.discard(self.process)
        self.client = self.clients[0]

    def _handshake(self, device: str, pairs: Sequence[tuple[socket.socket, socket.socket]],
                   timeout: float, reader: bool) -> None:
        try:
            for parent, _ in pairs:
                self.clients.append(DeviceClient(parent, timeout=timeout, name="pipeline",
                                                 reader=reader))
        except ConveyorError as exc:
            self._close_clients(pairs)
            self.process.kill()
            if type(exc).__name__ in ("ServerGone", "ProtocolError"):
                raise WorkerStartError(
                    f"the device worker for {device} did not start: {exc} "
                    f"({self.process.describe_exit()})"
                ) from exc
            raise
        except BaseException:
            self._close_clients(pairs)
            self.process.kill()
            raise

    def _close_clients(self, pairs: Sequence[tuple[socket.socket, socket.socket]]) -> None:
        for client in self.clients:
            client.close()
        for parent, _ in pairs[len(self.clients):]:
            parent.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self, timeout: float = 0.5) -> None:
        """Close the links; the worker exits when it sees the end of every stream."""
        for client in self.clients:
            client.close()
        self.process.stop(timeout)


def _fail(sock: socket.socket, exc: BaseException) -> None:
    """Answer the client's HELLO with a typed error, then exit."""
    sock.settimeout(5.0)
    try:
        FrameReader(sock).read_frame()  # the HELLO
        name = type(exc).__name__ if isinstance(exc, ConveyorError) else "WorkerStartError"
        body = json.dumps({"error": name, "message": str(exc)}).encode()
        sock.sendall(encode(MsgType.ERROR, body))
    except (OSError, ConveyorError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor-device-worker")
    parser.add_argument("--fd", type=int, action="append", required=True,
                        help="a connected socket to serve (repeat for several)")
    parser.add_argument("--lifeline", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--max-inflight", type=int, default=8)
    parser.add_argument("--realtime", type=int, default=0)
    args = parser.parse_args(argv)
    watch_lifeline(args.lifeline)
    logging.basicConfig(level=logging.WARNING, format="conveyor device worker: %(message)s")
    socks = [socket.socket(fileno=fd) for fd in args.fd]
    sock = socks[0]  # the first client's handshake is the start-up handshake
    from ..backends import open_device
    from ._server import DeviceServer

    try:
        device = open_device(args.device)
        server = DeviceServer([device], args.model, max_inflight=args.max_inflight,
                              max_queue=max(args.max_inflight * 2, 16),
                              realtime=args.realtime)
    except ConveyorError as exc:
        _fail(sock, exc)
        return 1
    except Exception as exc:
        _fail(sock, WorkerStartError(f"{type(exc).__name__}: {exc}"))
        return 1
    for each in socks:
        server.add_connection(each)
    server.serve_forever(exit_when_no_clients=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
