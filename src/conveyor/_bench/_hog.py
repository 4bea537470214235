"""The other program of the ``two_programs`` scenario: CPU-bound pure Python, nothing else.

``python -m conveyor._bench._hog`` spins in chunks of pure-Python arithmetic (about 5 ms
each), noting when each chunk ends, until its standard input closes; then it prints the
chunk end times (``time.monotonic_ns()``) as one JSON list and exits. Its speed over any
window is the chunks that ended in it.
"""

from __future__ import annotations

import json
import sys
import threading
import time

__all__ = ["chunks_per_s", "main"]

CHUNK = 20_000


def _chunk() -> int:
    total = 0
    for i in range(CHUNK):
        total += i * i % 7
    return total


def chunks_per_s(ends: list[int], start_ns: int, end_ns: int) -> float:
    """Chunks that ended inside [start_ns, end_ns], per second."""
    done = sum(1 for t in ends if start_ns <= t <= end_ns)
    return done / max(end_ns - start_ns, 1) * 1e9


def main() -> int:
    """Spin until stdin closes; print the chunk end times."""
    stop = threading.Event()

    def watch() -> None:
        # Blocks in read() with the GIL released; EOF (or any error) ends the spin.
        try:
            sys.stdin.buffer.read()
        finally:
            stop.set()

    threading.Thread(target=watch, daemon=True).start()
    ends: list[int] = []
    _chunk()
    print("ready", flush=True)
    while not stop.is_set():
        _chunk()
        ends.append(time.monotonic_ns())
    print(json.dumps(ends), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
