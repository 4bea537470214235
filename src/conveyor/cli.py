"""The ``conveyor`` command: one sub-command per module in :mod:`conveyor._cli`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import io
import os
import signal
import sys
from collections.abc import Sequence

from ._cli import terminated

__all__ = ["main"]

# (name, module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS = (
    ("demo", "demo", "detect faces in the bundled sample images"),
    ("detect", "detect", "detect faces in images, GIFs and videos"),
    ("models", "models", "list bundled models, or show one model's tensors"),
    ("devices", "devices", "list the devices present and usable, and why others are not"),
    ("serve", "serve", "own devices and serve many programs over a local socket"),
    ("status", "status", "show a device server's devices, clients, queues and latency"),
    ("top", "top", "watch a device server live in the terminal"),
    ("bench", "bench", "measure how busy the device stays under each concurrency design"),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Keep an edge accelerator busy while the CPU works, "
        "and share one accelerator between many programs.",
        epilog="examples:\n  conveyor demo\n  conveyor detect photos/ --json\n"
        "  conveyor serve --device cpu --model face_detection_short_range\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(f"conveyor._cli.{module_name}")
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


#: What a write to a full or failing output gives (commands let these reach main).
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _usable_std_streams() -> None:
    """A closed standard stream (``2>&-``) is None in Python: what conveyor wrote there
    raised AttributeError (detect and bench ended with nothing on stdout), and the
    descriptor was free for the next file opened, which C code writing to stderr then
    wrote into. It becomes /dev/null, as ``2>/dev/null`` would. Text the stream cannot
    encode (a name, under ``PYTHONIOENCODING=ascii``) is escaped instead of raising."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115 - for the process
        elif name != "stdin" and isinstance(stream, io.TextIOWrapper):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``conveyor`` console script; returns the exit code."""
    _usable_std_streams()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the sub-command's usage, not the top level's, says what it takes
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # SIGTERM (kill, timeout(1), a service manager) ends demo, detect and bench as Ctrl-C
    # does: their pipelines' workers, helper programs, device servers and folders are
    # closed and removed on the way out (killed by it, a private socket's folder was left
    # behind). serve and top have their own handling.
    previous = (signal.signal(signal.SIGTERM, terminated)
                if args.command in ("demo", "detect", "bench") else None)
    try:
        code: int = args._run(args)
    except KeyboardInterrupt as exc:
        # 128 + the signal's number, as a shell reports a program the signal ended
        return 143 if exc.args == ("SIGTERM",) else 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as Unix tools do. Point stdout
        # at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        # Output to a full disk (or /dev/full): one line, not a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"conveyor: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        if previous is not None and signal.getsignal(signal.SIGTERM) is terminated:
            signal.signal(signal.SIGTERM, previous)
    return code


if __name__ == "__main__":
    sys.exit(main())
