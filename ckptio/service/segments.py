"""Shared staging memory: memfd segments both the trainer and the service map.

The trainer snapshots into a segment exactly as into a private slot (page
aligned, pre-faulted, kept across saves); handing a save to the service is a
message carrying the segment's descriptor (SCM_RIGHTS), never a copy. A
memfd has no name, so nothing is left behind when both processes are gone,
whatever killed them; while either maps it, the snapshot lives.
"""

from __future__ import annotations

import ctypes
import mmap
import os

__all__ = ["SharedSegment", "map_segment"]

_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)  # Linux; Python < 3.10 lacks the name


class SharedSegment(mmap.mmap):
    """A writable shared mapping of a memfd, with the fields a staging slot
    uses (``address``, ``capacity``) and the descriptor to hand over (``fd``)."""

    fd: int
    address: int
    capacity: int

    def close_fd(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close_fd()


def create_segment(nbytes: int) -> SharedSegment:
    """A new segment of `nbytes`, its pages allocated and mapped now (so a
    snapshot pays no first-touch faults, and a short memory fails here with
    an OSError rather than with a SIGBUS mid-copy)."""
    fd = os.memfd_create("ckptio-staging", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        os.posix_fallocate(fd, 0, nbytes)
        segment = SharedSegment(fd, nbytes, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    segment.fd = fd
    segment.capacity = nbytes
    segment.address = _address_of(segment)
    return segment


def map_segment(fd: int) -> tuple[mmap.mmap, int]:
    """The service's mapping of a segment handed over as `fd` (which it
    then no longer needs): (mapping, address of its first byte)."""
    size = os.fstat(fd).st_size
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mapping, _address_of(mapping)


def _address_of(mapping: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(mapping)  # an export only while this function runs
    try:
        return ctypes.addressof(view)
    finally:
        del view
