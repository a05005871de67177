"""fastbroker beside the job systems a user would pick instead (issue 16 part 3): Dramatiq,
Celery and RQ on Redis, and NATS JetStream as a work queue. ``bench/test_peers.py`` runs
them; this package holds what their worker processes import (the task modules, the NATS
worker), the servers' start and stop, and the CPU accounting of process trees
(``common``). ``python -m bench.peers.table RUN.json`` prints RESULTS.md's table.

Nothing here imports a peer's package at import time but the peer's own modules, so
``pytest bench`` collects and skips cleanly where the ``bench-peers`` extra is missing.
"""
