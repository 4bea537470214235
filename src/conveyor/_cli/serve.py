"""Own one or more devices and serve inference to many programs over a local Unix socket.

The server loads the models on every device, then prints one line with its socket path and
serves until SIGTERM or Ctrl-C (the first drains in-flight requests, a second exits at once).
Programs connect with conveyor.connect(PATH) or use device="server:PATH" in a pipeline.

The socket is private to this user (mode 0600) unless --group shares it (0660) or
--allow-user opens it (0666); every connection's peer credentials are checked against this
user, --allow-user and --group. The default path
is $XDG_RUNTIME_DIR/conveyor.sock, else /tmp/conveyor-<uid>/conveyor.sock. Logs go to stderr.

examples:
  conveyor serve
  conveyor serve --device cpu --model face_detection_short_range --model face_landmark
  conveyor serve --socket /run/conveyor/tpu.sock --group video --device edgetpu:usb
  conveyor serve --device sim-edgetpu --max-queue 64 --metrics-port 9464
  conveyor serve --device edgetpu --realtime

--realtime runs each device thread under SCHED_FIFO, so that it takes a core the moment a
run ends instead of waiting behind the clients' Python (on a 2-core machine, device busy
0.85 -> 0.96 with four clients; BENCHMARKS.md). It needs root, CAP_SYS_NICE or an
RLIMIT_RTPRIO of at least the priority (systemd: LimitRTPRIO=1); without, the server runs
at normal priority and says so in its log and in `conveyor status`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .._device._protocol import MAX_INFLIGHT
from .._errors import ConveyorError
from ..backends import parse_device
from .status import socket_path

__all__ = ["add_arguments", "run"]


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _inflight(text: str) -> int:
    value = _positive(text)
    if value > MAX_INFLIGHT:  # clients refuse a larger credit
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INFLIGHT}, got {value}")
    return value


def _priority(text: str) -> int:
    value = _whole(text)
    if not 1 <= value <= 99:
        raise argparse.ArgumentTypeError(f"a SCHED_FIFO priority is 1 to 99, got {value}")
    return value


def _port(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``conveyor serve``'s arguments on ``parser``."""
    parser.add_argument("--socket", metavar="PATH", type=socket_path,
                        help="the Unix socket to listen on "
                        "(default: $XDG_RUNTIME_DIR/conveyor.sock or /tmp/conveyor-UID/...)")
    parser.add_argument("--device", metavar="SPEC", action="append", dest="devices",
                        help="a device to own: cpu, cpu:N, edgetpu, edgetpu:usb:N, "
                        "sim-edgetpu, onnx:cpu... (repeat for several; default cpu)")
    parser.add_argument("--model", metavar="NAME_OR_PATH", action="append", dest="models",
                        help="a model to serve (repeat for several; "
                        "default face_detection_short_range)")
    parser.add_argument("--group", metavar="NAME", help="share the socket with this group "
                        "(mode 0660) and allow its members")
    parser.add_argument("--allow-user", metavar="NAME|UID", action="append", default=[],
                        dest="allow_users", help="also allow this user (repeat for several); the "
                        "socket is then mode 0666 and the credential check decides")
    parser.add_argument("--max-queue", metavar="N", type=_positive, default=256,
                        help="requests waiting in total before new ones are refused "
                        "with Busy (default 256)")
    parser.add_argument("--max-inflight", metavar="N", type=_inflight, default=32,
                        help=f"requests one client may have in flight (default 32, at most "
                        f"{MAX_INFLIGHT})")
    parser.add_argument("--max-clients", metavar="N", type=_positive, default=256,
                        help="connections served at once, monitors included; more are "
                        "refused with a message saying so (default 256)")
    parser.add_argument("--realtime", metavar="PRIO", type=_priority, nargs="?", const=1,
                        default=0, help="run the device threads under SCHED_FIFO at PRIO "
                        "(1-99, default 1 when given; see above)")
    parser.add_argument("--metrics-port", metavar="P", type=_port,
                        help="serve Prometheus metrics on http://127.0.0.1:P/metrics")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default="info", help="what to log on stderr (default info)")
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="stop (draining, as on SIGTERM) when standard input closes: for "
                             "a server started by another program, so that it never "
                             "outlives that program")


def run(args: argparse.Namespace) -> int:
    """Run ``conveyor serve``: 0 after a clean stop, 1 if stopped at once, 2 if it could
    not start (the reason is printed)."""
    from .._device._serve import serve

    logging.basicConfig(
        stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s conveyor serve[%(process)d] %(levelname)s: %(message)s",
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    devices = args.devices or ["cpu"]
    models = args.models or ["face_detection_short_range"]

    def ready(path: Path) -> None:
        shown = [f"{d} (simulation)" if parse_device(d).kind == "sim-edgetpu" else d
                 for d in devices]
        print(f"conveyor serve: listening on {path} (pid {os.getpid()}; "
              f"devices {', '.join(shown)}; models {', '.join(models)})", flush=True)

    try:
        return serve(
            socket_path=args.socket, devices=devices, models=models, group=args.group,
            allow_users=args.allow_users, max_queue=args.max_queue,
            max_inflight=args.max_inflight, max_clients=args.max_clients,
            metrics_port=args.metrics_port, ready=ready,
            realtime=args.realtime, stop_on_eof=0 if args.exit_with_stdin else None,
        )
    except ConveyorError as exc:
        print(f"conveyor serve: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"conveyor serve: cannot start: {exc}", file=sys.stderr)
        return 2
