"""Stage functions whose module takes ``CONVEYOR_TEST_SLOW_IMPORT_S`` seconds to import in a
worker process (a heavy library, or an import that hangs), or fails to import there with
``CONVEYOR_TEST_FAIL_IMPORT``, and none of it in the test's own process
(``CONVEYOR_TEST_PARENT``)."""

from __future__ import annotations

import os
import time

if os.environ.get("CONVEYOR_TEST_PARENT", str(os.getpid())) != str(os.getpid()):
    time.sleep(float(os.environ.get("CONVEYOR_TEST_SLOW_IMPORT_S", "0")))
    if os.environ.get("CONVEYOR_TEST_FAIL_IMPORT"):
        raise RuntimeError("this import fails on purpose")


def pid(x: int) -> int:
    """The worker's pid."""
    return os.getpid()


def exit_on_1(x: int) -> int:
    """``x``; the worker exits (code 3) on item 1."""
    if x == 1:
        os._exit(3)
    return x
