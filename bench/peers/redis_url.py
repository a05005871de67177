"""Where the task modules of the Redis peers find the benchmark's redis-server."""

REDIS_URL_ENV = "FASTBROKER_PEERS_REDIS_URL"
