"""A self-pipe that wakes a loop waiting in poll, from any thread or a signal handler."""

from __future__ import annotations

import os


class WakePipe:
    """Both ends non-blocking: waking never blocks (a full pipe is already awake)
    and draining never waits."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._closed = False

    def wake(self) -> None:
        """Make read_fd readable; safe from other threads and signal handlers."""
        try:
            os.write(self.write_fd, b"\0")
        except OSError:
            pass  # full (the loop is already woken) or closed

    def drain(self) -> None:
        """Read every pending wake-up byte."""
        try:
            while os.read(self.read_fd, 4096):
                pass
        except OSError:
            pass  # empty (BlockingIOError) or closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
