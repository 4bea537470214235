"""Shared memory that cannot leak: anonymous memfd segments passed as file descriptors.

A segment is created with ``memfd_create``, sealed against shrinking (so a peer can never
make our mapping fault with SIGBUS), mapped, and handed to another process over a Unix
socket with ``SCM_RIGHTS``. It has no name in ``/dev/shm``; the kernel frees it when the
last process holding the descriptor or a mapping goes away, crash or not.
"""

from __future__ import annotations

import errno
import fcntl
import math
import mmap
import os
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ALIGN", "Segment", "align"]

ALIGN = 64
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Segment:
    """A mapped memfd segment.

    Create one with :meth:`create`; map one received from a peer with :meth:`attach`,
    which checks its size and seals before trusting it.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map: mmap.mmap | None = mmap.mmap(fd, size) if size else None
        self.buf = memoryview(self._map) if self._map is not None else memoryview(b"")

    @classmethod
    def create(cls, size: int, name: str = "conveyor") -> Segment:
        """A new sealed segment of ``size`` bytes (rounded up to :data:`ALIGN`)."""
        size = max(align(size), ALIGN)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int) -> Segment:
        """Map a segment received from a peer; takes ownership of ``fd``.

        Raises:
            ValueError: the fd is not a sealed memfd of at least ``size`` bytes.
            OSError: this process is out of descriptors or memory to map it.
        """
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK:
                raise ValueError("segment is not sealed against shrinking")
            if seals & (fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0)):
                raise ValueError("segment is sealed against writing; outputs are written "
                                 "into it")
            info = os.fstat(fd)
            actual = info.st_size
            if size <= 0 or actual < size:
                raise ValueError(f"segment has {actual} bytes, {size} announced")
            if info.st_blksize > mmap.PAGESIZE and size % info.st_blksize:
                # A huge-page memfd (MFD_HUGETLB) maps only in whole huge pages, and not
                # at all where none are free: refused as such, not as our own shortage.
                raise ValueError(f"segment is huge-page memory ({info.st_blksize} byte "
                                 f"pages) of {size} bytes, not a whole number of them")
            try:
                seg = cls(fd, size)
            except OSError as exc:
                if exc.errno == errno.ENOMEM and info.st_blksize > mmap.PAGESIZE:
                    raise ValueError("segment is huge-page memory, and no huge pages are "
                                     "free to map it") from exc
                raise
            # The mapping outlives the descriptor; closing it now means nothing to leak.
            os.close(fd)
            seg.fd = -1
            return seg
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise  # this process's own shortage (mmap takes a descriptor), not the peer's
            raise ValueError(f"not a shared-memory segment: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise

    def array(
        self, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> npt.NDArray[Any]:
        """A numpy view of the segment's bytes at ``offset`` (no copy)."""
        count = math.prod(shape)
        assert self._map is not None
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)

    def close_fd(self) -> None:
        """Close the descriptor (after sending it); the mapping stays valid."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Unmap and close. If views are still alive the mapping goes when they do."""
        if self._map is None and self.fd < 0:
            return
        try:
            self.buf.release()
        except BufferError:
            pass
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A view is still alive somewhere; the mapping is freed when it goes.
                pass
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
