"""``fastbroker broker --shards N``: N independent brokers, one process each, on endpoints
numbered from the ones given (fastbroker.addresses.shard_address), each with its own
store file; supervised by fastbroker.supervisor (SIGINT/SIGTERM stop them all, a shard
that dies is restarted). Nothing is shared or replicated between shards: clients and
workers given the list of shards spread the work (docs/OPERATIONS.md "Shards").
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Callable, List

from fastbroker._common import ConfigError
from fastbroker.addresses import shard_address, shard_path
from fastbroker.supervisor import stop_when_orphaned, supervise

log = logging.getLogger("fastbroker")

MAX_SHARDS = 256


def shard_args(args: argparse.Namespace, shard: int) -> argparse.Namespace:
    """The broker options of `shard`: its endpoints, its store file and its metrics port."""
    one = argparse.Namespace(**vars(args))
    one.shards = 1
    one.requests_addr = shard_address(args.requests_addr, shard)
    one.workers_addr = shard_address(args.workers_addr, shard)
    one.answers_addr = shard_address(args.answers_addr, shard)
    if args.store is not None:
        one.store = shard_path(args.store, shard)
    if args.metrics_port:  # 0 (a free port) stays 0
        one.metrics_port = args.metrics_port + shard
        if one.metrics_port > 65535:
            raise ConfigError(f"--metrics-port {args.metrics_port}: shard {shard} would need a port above 65535")
    return one


def plan(args: argparse.Namespace, shards: int) -> List[argparse.Namespace]:
    """Every shard's options; ConfigError if two shards' endpoints would meet."""
    every = [shard_args(args, k) for k in range(shards)]
    endpoints = [addr for one in every for addr in (one.requests_addr, one.workers_addr, one.answers_addr)]
    taken = set()
    for addr in endpoints:
        if addr in taken:
            raise ConfigError(
                f"{addr} would be bound by two shards: space the three endpoints' ports at least --shards apart "
                f"(e.g. tcp://*:5555 tcp://*:6555 tcp://*:7555)"
            )
        taken.add(addr)
    return every


def run_shards(args: argparse.Namespace, run_broker: Callable[[argparse.Namespace], int]) -> int:
    """Run `args.shards` brokers, shard k with ``run_broker(shard_args(args, k))`` in a
    child process, until SIGINT/SIGTERM; the highest exit status of the shards."""
    every = plan(args, args.shards)
    print(
        f"fastbroker: {args.shards} shards; requests {','.join(one.requests_addr for one in every)}; "
        f"workers {','.join(one.workers_addr for one in every)}",
        file=sys.stderr,
        flush=True,
    )

    def child(index: int, parent_pid: int) -> None:
        os.setpgrp()  # Ctrl-C reaches the supervisor, which passes it on once
        stopped = threading.Event()

        def stop() -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the broker's own handler stops it

        threading.Thread(target=stop_when_orphaned, args=(stop, stopped.is_set, parent_pid, log), daemon=True).start()
        code = run_broker(every[index])
        stopped.set()
        os._exit(code)

    return supervise(args.shards, child, "broker shard", log, config_error_stops_all=True)


__all__ = ["run_shards", "shard_args", "plan", "MAX_SHARDS"]
