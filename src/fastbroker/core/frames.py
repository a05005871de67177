"""core/frames.py: helpers on received messages (twin of core/frames.pxi).

Owns: nothing; these functions act on the frames they are given.
Touches: only those frames.

Compiled only (absent here): close_msgs (frames here are zmq.Frame objects that
Python frees), own_small_frames (copies small frames out of libzmq's shared receive
buffer; pyzmq's copy=False frames are not given such a copy here, as before).
"""

from __future__ import annotations

from typing import Sequence, Sized


def find_delimiter(m: Sequence[Sized]) -> int:
    """Index of the first empty frame of m, or -1."""
    for i, frame in enumerate(m):
        if len(frame) == 0:
            return i
    return -1
