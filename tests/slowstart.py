"""Stage functions whose module takes ``CONVEYOR_TEST_SLOW_IMPORT_S`` seconds to import in a
worker process (a heavy library, or an import that hangs), and none in the test's own
process (``CONVEYOR_TEST_PARENT``)."""

from __future__ import annotations

import os
import time

if os.environ.get("CONVEYOR_TEST_PARENT", str(os.getpid())) != str(os.getpid()):
    time.sleep(float(os.environ.get("CONVEYOR_TEST_SLOW_IMPORT_S", "0")))


def exit_on_1(x: int) -> int:
    """``x``; the worker exits (code 3) on item 1."""
    if x == 1:
        os._exit(3)
    return x
