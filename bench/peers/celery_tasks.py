"""The Celery app of the peer benchmark, imported by ``celery -A bench.peers.celery_tasks
worker`` and by the client: Redis (at $FASTBROKER_PEERS_REDIS_URL) as broker and result
backend, everything else Celery's defaults (JSON, prefork pool, prefetch multiplier 4)."""

from __future__ import annotations

import os

from celery import Celery

from bench.peers.redis_url import REDIS_URL_ENV

URL = os.environ[REDIS_URL_ENV]
app = Celery("fastbroker_peers", broker=URL, backend=URL)


@app.task
def echo(payload: str) -> str:
    return payload
