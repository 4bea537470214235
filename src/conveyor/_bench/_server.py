"""A device server for the bench's ``server_N`` scenarios, when ``conveyor serve`` is absent.

``python -m conveyor._bench._server --device SPEC --model NAME --socket PATH`` opens the
device, serves the model on a Unix socket with :class:`conveyor._device._server.DeviceServer`
(the same server ``conveyor serve`` runs), prints ``ready`` once it listens, and drains and
exits when its standard input closes.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until stdin closes; see the module docstring."""
    parser = argparse.ArgumentParser(prog="conveyor-bench-server")
    parser.add_argument("--device", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .._device._server import DeviceServer
    from ..backends import open_device

    device = open_device(args.device)
    try:
        server = DeviceServer([device], [args.model])
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.socket)
        listener.listen(64)
        server.add_listener(listener)

        def watch() -> None:
            try:
                sys.stdin.buffer.read()
            finally:
                server.shutdown()

        threading.Thread(target=watch, daemon=True).start()
        print("ready", flush=True)
        server.serve_forever()
    finally:
        device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
