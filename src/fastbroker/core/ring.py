"""core/ring.py: twin of core/ring.pxi, the compiled core's FIFO of 64-bit slot handles.

Compiled only (absent here): Ring and its functions ring_push, ring_front,
ring_drop_front, ring_clear and make_handle. The pure parts that hold a ring in the
compiled core (JobQueue, KeptOutcomes) hold a ``collections.deque`` of the objects
themselves; IdleWorkers holds an OrderedDict. A request object that was released
(state FREE) plays the part of a handle whose generation no longer matches: a
tombstone, dropped when it reaches the front.
"""
