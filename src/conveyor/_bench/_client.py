"""One client program of the ``server_N`` scenarios.

``python -m conveyor._bench._client --socket PATH --work JSON --first I --items N``
connects to the device server, warms up, prints ``ready``, waits for a line on standard
input, then runs its items: each prepared here, sent to the server with
:meth:`DeviceClient.submit` (``--depth`` requests in flight, so the device works on one
while this program prepares the next) and finished here. It prints one JSON object (its
window, latencies, device spans as the server timed them, and its CPU spans) and exits
when standard input closes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from ._workload import Workload, finish, prepare

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one client; see the module docstring."""
    parser = argparse.ArgumentParser(prog="conveyor-bench-client")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--work", required=True, help="the Workload as a JSON object")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .._device._client import connect

    work = Workload(**json.loads(args.work))
    first = args.first
    latencies: list[int] = []
    device: list[tuple[int, int]] = []
    cpu: list[tuple[int, int]] = []
    every = 32  # progress: a line "+32" each time that many items are done
    with connect(args.socket, name=f"bench-client-{first}") as client:
        pending: deque[tuple[int, int, Any]] = deque()

        def finish_one(record: bool) -> None:
            i, t0, fut = pending.popleft()
            outs = fut.result()
            t = time.monotonic_ns()
            finish(work, i, outs)
            end = time.monotonic_ns()
            if record:
                cpu.append((t, end))
                latencies.append(end - t0)
                timing = fut.timing
                if timing is not None:
                    device.append((timing.start_ns, timing.start_ns + timing.compute_ns))
                if len(latencies) % every == 0:
                    print(f"+{every}", flush=True)

        def run(indices: range, record: bool) -> None:
            for i in indices:
                t0 = time.monotonic_ns()
                x = prepare(work, i)
                if record:
                    cpu.append((t0, time.monotonic_ns()))
                pending.append((i, t0, client.submit(work.model, x)))
                if len(pending) >= args.depth:
                    finish_one(record)
            while pending:
                finish_one(record)

        run(range(first, first + args.warmup), record=False)
        print("ready", flush=True)
        if not sys.stdin.readline():
            return 1  # the bench went away
        start = time.monotonic_ns()
        run(range(first, first + args.items), record=True)
        end = time.monotonic_ns()
    if len(latencies) % every:
        print(f"+{len(latencies) % every}", flush=True)
    print(
        json.dumps(
            {"start": start, "end": end, "latencies": latencies, "device": device, "cpu": cpu}
        ),
        flush=True,
    )
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
