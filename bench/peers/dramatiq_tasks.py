"""The Dramatiq actor of the peer benchmark, imported by ``dramatiq bench.peers.dramatiq_tasks``
and by the client: a RedisBroker at $FASTBROKER_PEERS_REDIS_URL with the Results middleware
on the Redis backend (the same server), as Dramatiq's documentation sets them up."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from bench.peers.redis_url import REDIS_URL_ENV

URL = os.environ[REDIS_URL_ENV]
broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=RedisBackend(url=URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True)
def echo(payload: str) -> str:
    return payload
