"""fastbroker's user path as the peers' reference: ``Client.map`` in this process, a
``fastbroker broker`` process (compiled core, tcp on 127.0.0.1, like the peers' servers)
and ``fastbroker worker bench.test_user_path:Echo --processes N`` (the user path's
``Worker`` subclass whose ``process()`` returns its input); and its broker alone, under
the compiled load generators (LoadgenPeer)."""

from __future__ import annotations

import os
import subprocess
import time
from typing import List, Optional

from fastbroker import Client

from bench import e2e
from bench.peers import common

WORKER_CLASS = "bench.test_user_path:Echo"
"""The worker of bench/test_user_path.py, shared rather than copied."""


def start_broker(run: e2e.Run) -> tuple:
    """A ``fastbroker -v broker --core compiled`` on free loopback ports:
    ((requests address, workers address), process)."""
    argv = ["-m", "fastbroker", "-v", "broker", "--core", "compiled", *["tcp://127.0.0.1:*"] * 3]
    proc = common.start(run, argv, "fastbroker-broker")
    text = run.wait_for_broker(proc, "peers", "compiled", time.monotonic() + common.START_LIMIT)
    info = text.split("broker on requests=", 1)[1].split()
    return (info[0], info[1].split("=", 1)[1]), proc


class FastbrokerPeer:
    """One row: the worker pool started with `credit` (None: the CLI's default, 1)."""

    modules: tuple = ()
    servers: tuple = ()
    expected = common.PAYLOADS

    def __init__(self, run: e2e.Run, endpoints: tuple, credit: Optional[int]) -> None:
        self.run = run
        self.requests, self.workers = endpoints
        self.credit = credit
        self.procs: List[subprocess.Popen] = []
        self.client: Optional[Client] = None

    def start(self, processes: int) -> List[int]:
        argv = ["-m", "fastbroker", "-v", "worker", WORKER_CLASS, self.workers, "--processes", str(processes)]
        if self.credit is not None:
            argv += ["--credit", str(self.credit)]
        pool = common.start(self.run, argv, f"fastbroker-worker-{processes}")
        self.procs.append(pool)
        # Each pool process logs "connected to ..." when it first hears from the broker.
        common.wait_for_log(pool, "connected to", time.monotonic() + common.START_LIMIT, count=processes)
        self.client = Client(self.requests)
        return [pool.pid]

    def call(self, i: int) -> None:
        assert self.client is not None
        answer = self.client.call(common.PAYLOADS[i], wait=common.RTT_LIMIT)
        assert answer == common.PAYLOADS[i], answer

    def run_all(self) -> list:
        assert self.client is not None
        return list(self.client.map(common.PAYLOADS))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for proc in self.procs:
            common.stop(proc)


LOADGEN_WINDOW = 1024
"""Jobs the compiled client keeps in flight (FBC02 batches of what the window lets in)."""


class LoadgenPeer:
    """The broker alone: the same ``fastbroker broker`` process under the compiled load
    generators of bench/_loadgen.pyx (C loops without the GIL), as bench/e2e.py
    ``--protocol fbc2`` runs them: N FBW02 worker processes, and the FBC02 client in this
    process (so its CPU is this process's, as every row's client). What fastbroker's
    broker does when its clients and workers cost next to nothing. The round trip is one
    job at a time from the same client."""

    modules: tuple = ()
    servers: tuple = ()

    def __init__(self, run: e2e.Run, endpoints: tuple) -> None:
        if e2e._loadgen is None:
            raise RuntimeError(f"bench._loadgen does not import ({e2e.LOADGEN_ERROR}); run `make loadgen`")
        self.run = run
        self.requests, self.workers = endpoints
        self.procs: List[subprocess.Popen] = []
        self.sock = e2e.child_dealer(self.requests)
        self.expected = [common.PEERS_N]

    def start(self, processes: int) -> List[int]:
        me = str(os.getpid())
        deadline = time.monotonic() + common.START_LIMIT
        for k in range(processes):
            proc = self.run.start(["-m", "bench.e2e", "_worker", "fbw2", self.workers, me, "compiled"], f"loadgen-{k}")
            self.procs.append(proc)
            if e2e.Lines(proc, f"loadgen-{k}").read(deadline) != "connected":
                raise RuntimeError(f"loadgen worker did not connect:\n{self.run.stderr_of(proc)}")
        return [proc.pid for proc in self.procs]

    def _jobs(self, n: int, window: int) -> dict:
        assert e2e._loadgen is not None
        # A fresh id prefix each time: the broker would answer a repeated id from its kept outcomes.
        return e2e._loadgen.client(self.sock, n, window, 16, 0, os.urandom(8), e2e._loadgen.MODE_FBC2, e2e.STALL, 0)

    def call(self, i: int) -> None:
        self._jobs(1, 1)

    def run_all(self) -> list:
        # The client checks every answer itself (right id and payload, each once).
        return [self._jobs(common.PEERS_N, LOADGEN_WINDOW)["n"]]

    def close(self) -> None:
        self.sock.close(0)
        for proc in self.procs:
            common.stop(proc)
