"""The broker's figures for operators: the FBC01 STATS command (client side) and a
Prometheus endpoint (``fastbroker broker --metrics-port``).

Where the figures come from. The metrics are read in the HTTP server's threads while
the broker's loop runs in another one. The compiled core's loop runs without the GIL,
so ``Broker.stats()`` called from a scrape thread reads fields the loop is changing:
each counter on its own is fine, but figures made of two fields are not ("running" is
``table.count - n_queued``, two unsigned fields read at different moments, which can
wrap to ~1.8e19 for a scrape; a histogram's count and buckets can disagree). So a
scrape sends the STATS command to the broker on an inproc endpoint of its requests
socket and the loop answers it between two messages: one consistent snapshot, read
by the thread that owns the core. Only the drop reasons, which STATS does not carry,
are taken from ``Broker.stats()["drops"]``: each is a single counter that only grows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import zmq

from fastbroker._common import Closeable, ConfigError
from fastbroker.client.protocol import stats_message
from fastbroker.protocol import (
    CLIENT_SIGNATURE,
    COUNTERS,
    DROP_REASONS,
    R_STATS,
    REQUEST_ID_SIZE,
    decode_stats,
)

log = logging.getLogger("fastbroker.metrics")

SCRAPE_WAIT = 2.0
"""Seconds a scrape waits for the broker's STATS reply before it gives up."""

DEFAULT_METRICS_HOST = "127.0.0.1"


# -- STATS, client side ---------------------------------------------------------------


def decode_stats_reply(frames: Sequence[bytes], request_id: bytes) -> Optional[Dict[str, int]]:
    """The figures in ``[FBC01, R_STATS, id, names, values]`` (as a DEALER receives it)
    for `request_id`; None for any other message. ValueError if names and values do
    not match."""
    if len(frames) != 5 or bytes(frames[0]) != CLIENT_SIGNATURE or bytes(frames[1]) != R_STATS:
        return None
    if bytes(frames[2]) != request_id:
        return None
    return decode_stats(bytes(frames[3]), bytes(frames[4]))


def request_stats(socket: zmq.Socket, wait: float) -> Optional[Dict[str, int]]:
    """Send STATS on a connected DEALER and return the broker's figures, or None if no
    reply came within `wait` seconds. Replies to earlier, abandoned requests (a late
    answer to a scrape that gave up) are skipped by their id."""
    request_id = os.urandom(REQUEST_ID_SIZE)
    socket.send_multipart(stats_message(request_id))
    deadline = time.monotonic() + wait
    for _ in range(1_000_000):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not socket.poll(max(1, int(remaining * 1000))):
            return None
        figures = decode_stats_reply(socket.recv_multipart(), request_id)
        if figures is not None:
            return figures
    return None


def latency_buckets(figures: Dict[str, int]) -> List[Tuple[float, int]]:
    """The latency histogram of a STATS reply: [(upper bound in seconds, count)],
    non-cumulative, the last bound inf."""
    prefix = "latency_le_"
    buckets = []
    for name, value in figures.items():
        if name.startswith(prefix):
            bound = name[len(prefix) :]
            buckets.append((float("inf") if bound == "inf" else float(bound), value))
    return sorted(buckets)


def format_stats(figures: Dict[str, int]) -> str:
    """A STATS reply as an aligned table, in the broker's order, latency in ms."""
    rows: List[Tuple[str, str]] = []
    for name, value in figures.items():
        if name.startswith("latency_le_"):
            continue
        if name == "latency_sum_us":
            rows.append(("latency_sum", f"{value / 1e6:.6f} s"))
        else:
            rows.append((name, str(value)))
    count = figures.get("latency_count", 0)
    if count:
        rows.append(("latency_mean", f"{figures.get('latency_sum_us', 0) / count / 1000:.3f} ms"))
    for bound, value in latency_buckets(figures):
        label = "latency <= inf" if bound == float("inf") else f"latency <= {bound * 1000:g} ms"
        rows.append((label, str(value)))
    width = max(len(name) for name, _ in rows) if rows else 0
    return "\n".join(f"{name:<{width}}  {value:>12}" for name, value in rows)


# -- Prometheus ------------------------------------------------------------------------

# Counters with a name of their own (others are exported as fastbroker_<counter>_total).
COUNTER_METRICS = {
    "requests": ("fastbroker_requests", "Requests accepted into the queue."),
    "answered": ("fastbroker_answered", "Requests answered to their client."),
    "failed": ("fastbroker_failed", "FAILED reports from workers (each counts a try)."),
    "timeouts": ("fastbroker_timeouts", "Attempts whose deadline passed."),
    "retried": ("fastbroker_retried", "Timed-out or failed requests put back in the queue."),
    "aborted": ("fastbroker_aborted", "Requests given up after their last try."),
    "cancelled": ("fastbroker_cancelled", "FBC01 requests cancelled by their client."),
    "rejected": ("fastbroker_rejected", "FBC01 SUBMITs answered REJECTED."),
    "workers_joined": ("fastbroker_workers_joined", "DEALER (FBW01, FBW02) workers that registered."),
    "workers_left": ("fastbroker_workers_left", "DEALER workers that sent DISCONNECT."),
    "workers_dead": ("fastbroker_workers_dead", "DEALER workers silent past liveness or whose connection was gone."),
    "replies_dropped": ("fastbroker_replies_dropped", "Replies not sent to a client not reading (high-water mark)."),
    "replies_unroutable": ("fastbroker_replies_unroutable", "Replies not sent to a client that had disconnected."),
    "dead_requeued": ("fastbroker_dead_requeued", "Dead requests queued again by REQUEUE."),
}
GAUGE_METRICS = {
    "queued": ("fastbroker_jobs_queued", "Requests waiting for a worker."),
    "running": ("fastbroker_jobs_running", "Requests sent to a worker and not yet answered."),
    "workers": ("fastbroker_workers", "Registered DEALER (FBW01, FBW02) workers."),
    "idle_workers": ("fastbroker_workers_idle", "Workers waiting for a job."),
    "retained": ("fastbroker_retained_outcomes", "Finished FBC01 outcomes kept for RESULT."),
    "retained_bytes": ("fastbroker_retained_bytes", "Memory counted for kept outcomes."),
    "dead": ("fastbroker_dead", "Requests given up (FAILED or TIMED_OUT) kept with their payload for REQUEUE."),
}
# "dropped" is exported by reason (from Broker.stats()["drops"]).
UNLABELLED_COUNTERS = tuple(c for c in COUNTERS if c != "dropped")


class BrokerCollector:
    """A prometheus_client collector: on each scrape, asks the broker for STATS on an
    inproc DEALER (see the module's doc) and yields the metric families."""

    def __init__(self, broker: Any, wait: float = SCRAPE_WAIT) -> None:
        self._broker = broker
        self.wait = wait
        self._lock = threading.Lock()  # a DEALER is not thread-safe; scrapes may overlap
        self._socket: Optional[zmq.Socket] = broker.context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(broker.inproc_endpoint())

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close(0)
                self._socket = None

    def snapshot(self) -> Optional[Tuple[Dict[str, int], Dict[str, int]]]:
        """(STATS figures, drops by reason), or None if the broker did not answer."""
        with self._lock:
            if self._socket is None:
                return None
            figures = request_stats(self._socket, self.wait)
        if figures is None:
            return None
        return figures, self._broker.stats()["drops"]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        try:
            snapshot = self.snapshot()
        except (zmq.ZMQError, ValueError) as exc:
            log.warning("metrics: cannot read the broker's figures: %s", exc)
            return
        if snapshot is None:
            log.warning("metrics: no STATS reply from the broker within %g s", self.wait)
            return
        figures, drops = snapshot
        for key in UNLABELLED_COUNTERS:
            if key not in figures:
                continue
            name, doc = COUNTER_METRICS.get(key, (f"fastbroker_{key}", f"Broker counter {key!r}."))
            yield CounterMetricFamily(name, doc, value=figures[key])
        dropped = CounterMetricFamily(
            "fastbroker_dropped", "Malformed or unknown messages dropped, by reason.", labels=["reason"]
        )
        # Every reason appears from the first scrape on, so rate() sees the first drop.
        for reason in DROP_REASONS:
            dropped.add_metric([reason], drops.get(reason, 0))
        yield dropped
        for key, (name, doc) in GAUGE_METRICS.items():
            if key in figures:
                yield GaugeMetricFamily(name, doc, value=figures[key])
        cumulative, buckets = 0, []
        for bound, count in latency_buckets(figures):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        if buckets:
            yield HistogramMetricFamily(
                "fastbroker_job_latency_seconds",
                "Seconds from a request's arrival to its answer, answered requests only.",
                buckets=buckets,
                sum_value=figures.get("latency_sum_us", 0) / 1e6,
            )


class MetricsServer(Closeable):
    """Serves the broker's metrics at http://HOST:PORT/metrics (port 0: a free one, see
    ``port``). Build it before ``broker.run()`` (it binds an inproc endpoint on the
    broker's requests socket) and close it before ``broker.close()``. OSError if the
    address cannot be served (port in use, unknown host); ConfigError without
    prometheus_client."""

    def __init__(self, broker: Any, port: int, host: str = DEFAULT_METRICS_HOST, wait: float = SCRAPE_WAIT) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
            from prometheus_client.process_collector import ProcessCollector
        except ImportError:
            raise ConfigError(
                "--metrics-port needs the prometheus_client package (pip install prometheus_client)"
            ) from None
        self.collector = BrokerCollector(broker, wait)
        try:
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(self.collector)
            ProcessCollector(registry=self.registry)
            self._server, self._thread = start_http_server(port, host, self.registry)
        except BaseException:
            self.collector.close()
            raise
        self.host = host
        self.port: int = self._server.server_address[1]
        self._closed = False
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
        self.collector.close()


__all__ = [
    "BrokerCollector",
    "MetricsServer",
    "decode_stats_reply",
    "format_stats",
    "latency_buckets",
    "request_stats",
    "stats_message",
]
