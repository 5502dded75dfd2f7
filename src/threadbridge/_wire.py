"""Framing for the private pipes between the parent and its worker processes.

A frame is a header (payload length, kind, job id) followed by the payload. The worker
reads with blocking reads (``FrameReader``) in threads of its own; the parent writes jobs
from the event loop's thread (or a helper thread, for large ones) and parses answers from
a non-blocking pipe with ``FrameParser``. Worker processes import this module: it stays
light.
"""

from __future__ import annotations

import os
import select
import struct

HEADER = struct.Struct("!QBQ")  # payload length (64 bits: jobs over 4 GiB too), kind, job id

# parent -> worker, on the job pipe
INIT = 1  # payload: pickled settings (sys.path, argv, main script, modules to warm)
RUN = 2  # payload: pickled (func, args)
EXIT = 3  # no payload: finish and exit
TRACE = 4  # payload: pickled trace context (W3C headers) of the RUN that follows
# parent -> worker, on the control pipe
STOP = 10  # rung 1 for a job: set its token
INTERRUPT = 11  # rung 2 for a job: SIGTERM to the worker's process group
ASK_WHERE = 12  # where is the job's target now? (answered by HERE)
SAY_WHERE = 13  # rung 3 comes: where is the job's target? (answered by WHERE)
# worker -> parent, on the result pipe
ANSWER = 21  # payload: pickled (how it ended, value, whether rung 2 reached it)
NAMES = 22  # payload: pickled (main source, names its import as __mp_main__ bound)
INIT_FAILED = 23  # payload: an answer (raised, the initializer's error); the worker exits
INITIALIZING = 24  # no payload: the pool's initializer starts now
READY = 25  # no payload: the worker has booted (and run the initializer): jobs may come
WHERE = 26  # payload: pickled (line, stack) or None: where the job's target was as rung 2
# fired, or as SAY_WHERE asked
HERE = 27  # payload: pickled stack (or None): where the job's target is, as ASK_WHERE asked

# The exit status of a worker whose pipes to the parent a target closed or replaced
# (sysexits' EX_IOERR); the parent reports it as such.
PIPES_LOST = 74


def write_frame(fd: int, kind: int, job: int = 0, payload: bytes = b"") -> None:
    data = HEADER.pack(len(payload), kind, job) + payload
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameParser:
    """Splits a non-blocking byte stream into frames."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def wanted(self) -> int:
        """How many more bytes complete the frame begun (a header's worth if none is)."""
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            return HEADER.size - len(buffer)
        size: int = HEADER.unpack_from(buffer)[0]
        return HEADER.size + size - len(buffer)

    def read_size(self) -> int:
        """How much the next read should ask for: 64 KiB for small frames (a larger
        buffer is allocated with mmap and freed with munmap, system calls that cost more
        than a call, and munmap interrupts the process's other threads), or what the
        frame under way still needs, in pieces of at most 16 MiB."""
        return min(max(self.wanted(), 1 << 16), 1 << 24)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames = []
        while len(buffer) >= HEADER.size:
            size, kind, job = HEADER.unpack_from(buffer)
            end = HEADER.size + size
            if len(buffer) < end:
                break
            frames.append((kind, job, bytes(buffer[HEADER.size : end])))
            del buffer[:end]
        return frames


class FrameReader:
    """Blocking reads of frames from a pipe (the worker's side). One read takes whatever
    has arrived, so that a job's header and payload usually cost one system call."""

    __slots__ = ("_fd", "_parser", "_ready")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._parser = FrameParser()
        self._ready: list[tuple[int, int, bytes]] = []

    def ready(self, timeout: float) -> bool:
        """Whether ``read()`` would return at once, waiting up to ``timeout`` seconds."""
        if self._ready:
            return True
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def read(self) -> tuple[int, int, bytes] | None:
        """The next frame as (kind, job, payload), or None at end of file."""
        while not self._ready:
            chunk = os.read(self._fd, self._parser.read_size())
            if not chunk:
                return None
            self._ready = self._parser.feed(chunk)
        return self._ready.pop(0)
