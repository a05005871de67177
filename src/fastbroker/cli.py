"""The ``fastbroker`` command: broker, worker, demo, keygen, and the client
sub-commands submit, status, cancel and stats.

Bad input ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

from fastbroker import __version__
from fastbroker._common import (
    BrokerError,
    ConfigError,
    check_count,
    check_heartbeat,
    check_max_extend,
    check_max_queue,
    check_retention,
    check_retention_bytes,
    check_seconds,
    check_timeout,
    check_tries,
)
from fastbroker._select import CORE_NAMES
from fastbroker.protocol import (
    DEFAULT_HEARTBEAT,
    DEFAULT_LIVENESS,
    DEFAULT_MAX_EXTEND,
    DEFAULT_RETENTION,
    DEFAULT_RETENTION_BYTES,
    MAX_CREDIT,
    MAX_DEAD_LIST,
    MAX_LIVENESS,
    MIN_LIVENESS,
)
from fastbroker.server.logsetup import LOG_FORMATS, setup_logging
from fastbroker.server.shards import MAX_SHARDS
from fastbroker.server.store import DEFAULT_SYNC, SYNC_LEVELS
from fastbroker.server.store_files import DEFAULT_STORE_FORMAT, STORE_FORMATS
from fastbroker.signals import install_stop_handlers

if TYPE_CHECKING:  # annotations only; the commands import these where they run
    from fastbroker.client.protocol import Reply
    from fastbroker.security import CurveKeys

EXIT_USAGE = 2
# Exit statuses of `submit` (and `status`/`cancel`), by outcome.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMED_OUT = 3
EXIT_CANCELLED = 4
EXIT_REJECTED = 5
EXIT_NO_REPLY = 6
DEFAULT_SUBMIT_WAIT = 60.0
DEFAULT_QUERY_WAIT = 5.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the help to read, instead of argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _tries(text: str) -> int:
    try:
        return check_tries(int(text))  # type: ignore[return-value]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            str(exc) if isinstance(exc, ConfigError) else f"not a whole number: {text!r}"
        ) from None


def _timeout(text: str) -> float:
    try:
        return check_timeout(float(text))  # type: ignore[return-value]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            str(exc) if isinstance(exc, ConfigError) else f"not a number: {text!r}"
        ) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(check: Callable[[float], float]) -> Callable[[str], float]:
    """An argparse type: a number of seconds that `check` accepts (its ConfigError text)."""

    def parse(text: str) -> float:
        try:
            return check(float(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                str(exc) if isinstance(exc, ConfigError) else f"not a number: {text!r}"
            ) from None

    return parse


_heartbeat = _seconds(check_heartbeat)
_retention = _seconds(check_retention)
_max_extend = _seconds(check_max_extend)


def _count(name: str, high: int, low: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        try:
            return check_count(name, value, low, high)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """Bytes, with an optional binary suffix: 65536, 64K, 64M, 1G (KiB, MiB... also accepted)."""
    value = text.strip().upper()
    for tail in ("IB", "B"):
        if value.endswith(tail) and len(value) > len(tail):
            value = value[: -len(tail)]
            break
    suffix = value[-1:] if value[-1:] in _SIZE_SUFFIXES else ""
    number = value[: len(value) - len(suffix)]
    try:
        amount = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes (e.g. 64M, 1G): {text!r}") from None
    if amount != amount or amount in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a size in bytes (e.g. 64M, 1G): {text!r}")
    return int(amount * _SIZE_SUFFIXES[suffix])


def _memory(text: str) -> int:
    """--retention-memory: a size (see _size) within check_retention_bytes."""
    try:
        return check_retention_bytes(_size(text))
    except (ConfigError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _max_message(text: str) -> int:
    """--max-message: a size (see _size) within broker.check_max_message."""
    from fastbroker.server.broker import check_max_message

    try:
        return check_max_message(_size(text))  # type: ignore[return-value]
    except (ConfigError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _max_queue(text: str) -> int:
    try:
        return check_max_queue(int(text))  # type: ignore[return-value]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            str(exc) if isinstance(exc, ConfigError) else f"not a whole number: {text!r}"
        ) from None


def _request_timeout(text: str) -> float:
    from fastbroker.client.protocol import check_request_timeout

    try:
        return check_request_timeout(float(text))  # type: ignore[return-value]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            str(exc) if isinstance(exc, ConfigError) else f"not a number: {text!r}"
        ) from None


def _request_tries(text: str) -> int:
    from fastbroker.client.protocol import check_request_tries

    try:
        return check_request_tries(int(text))  # type: ignore[return-value]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            str(exc) if isinstance(exc, ConfigError) else f"not a whole number: {text!r}"
        ) from None


def _wait(text: str) -> float:
    try:
        return check_seconds("--wait", float(text), 0.001, 365 * 86400.0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            str(exc) if isinstance(exc, ConfigError) else f"not a number: {text!r}"
        ) from None


def _request_id(text: str) -> bytes:
    from fastbroker.client.protocol import check_request_id

    try:
        return check_request_id(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


DEFAULT_METRICS_HOST = "127.0.0.1"  # the same as fastbroker.server.metrics'; not imported: it loads zmq


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 0 and 65535, not {value}")
    return value


def _add_query_wait(p: argparse.ArgumentParser, per_command: bool = False) -> None:
    """-w/--wait of the one-shot client commands (status, cancel, stats, dead)."""
    p.add_argument(
        "-w",
        "--wait",
        type=_wait,
        default=DEFAULT_QUERY_WAIT,
        metavar="SECONDS",
        help=f"seconds to wait for the broker{', per command' if per_command else ''} (default: {DEFAULT_QUERY_WAIT:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastbroker", description="ZeroMQ task broker: workers ask for jobs when ready.")
    parser.add_argument("--version", action="version", version=f"fastbroker {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default=None, help="log lines as text (default) or one JSON object each"
    )
    # -v and --log-format are also accepted after the sub-command; -v counts add up.
    verbose = _Parser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", dest="sub_verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    verbose.add_argument(
        "--log-format",
        dest="sub_log_format",
        choices=LOG_FORMATS,
        default=None,
        help="log lines as text (default) or one JSON object each",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    # The CURVE options of every command that connects to a broker (workers and clients).
    curve = _Parser(add_help=False)
    group = curve.add_argument_group("CURVE (with a broker run with --curve-secret and --authorized-keys)")
    group.add_argument(
        "--curve-server-key", metavar="FILE", default=None, help="the broker's public key file (BROKER.key)"
    )
    group.add_argument(
        "--curve-secret",
        metavar="FILE",
        default=None,
        help="this peer's secret key file (NAME.key_secret); its public key must be in the broker's --authorized-keys",
    )

    p = sub.add_parser(
        "broker", help="run a broker", description="Run a broker until SIGINT or SIGTERM.", parents=[verbose]
    )
    p.add_argument(
        "-t",
        "--tries",
        type=_tries,
        default=None,
        help="attempts per job before the client gets the empty answer (default: unlimited)",
    )
    p.add_argument(
        "-T",
        "--timeout",
        type=_timeout,
        default=None,
        help="seconds an attempt may take before the job is re-sent (default: none)",
    )
    p.add_argument(
        "--core", choices=CORE_NAMES, default=None, help="broker core (default: compiled unless FASTBROKER_PURE=1)"
    )
    p.add_argument(
        "--heartbeat",
        type=_heartbeat,
        default=None,
        metavar="SECONDS",
        help=f"seconds between heartbeats to DEALER workers (default: {DEFAULT_HEARTBEAT})",
    )
    p.add_argument(
        "--liveness",
        type=_count("liveness", MAX_LIVENESS, MIN_LIVENESS),
        default=None,
        metavar="N",
        help=f"heartbeats of silence after which a DEALER worker is dead (default: {DEFAULT_LIVENESS})",
    )
    p.add_argument(
        "--retention",
        type=_retention,
        default=DEFAULT_RETENTION,
        metavar="SECONDS",
        help=f"seconds a finished FBC01 outcome is kept for RESULT (default: {DEFAULT_RETENTION:g}; 0 keeps none)",
    )
    p.add_argument(
        "--retention-memory",
        type=_memory,
        default=DEFAULT_RETENTION_BYTES,
        metavar="BYTES",
        help=f"memory bound on kept outcomes, e.g. 64M, 1G (default: {DEFAULT_RETENTION_BYTES >> 20}M)",
    )
    p.add_argument(
        "--max-queue",
        type=_max_queue,
        default=None,
        metavar="N",
        help="most requests waiting for a worker; beyond it a new one is rejected (queue full) at once (default: no limit)",
    )
    p.add_argument(
        "--max-extend",
        type=_max_extend,
        default=DEFAULT_MAX_EXTEND,
        metavar="SECONDS",
        help=f"the most one EXTEND from a worker moves its job's deadline from now (default: {DEFAULT_MAX_EXTEND:g})",
    )
    p.add_argument(
        "--max-message",
        type=_max_message,
        default=None,
        metavar="BYTES",
        help="largest frame a peer may send, e.g. 1M; a peer sending a larger one is disconnected (default: no limit)",
    )
    p.add_argument(
        "--curve-secret",
        metavar="FILE",
        default=None,
        help="the broker's secret key file: every endpoint uses CURVE (needs --authorized-keys)",
    )
    p.add_argument(
        "--authorized-keys",
        metavar="DIR",
        default=None,
        help="directory of the public key files (*.key) of the workers and clients let in (needs --curve-secret)",
    )
    p.add_argument(
        "--store",
        metavar="PATH",
        default=None,
        help="keep requests and outcomes in this file: they survive a crash and restart (created if missing)",
    )
    p.add_argument(
        "--store-format",
        choices=STORE_FORMATS,
        default=None,
        help=f"with --store: a new file's format, an append-only log or SQLite; an existing file keeps its own (default: {DEFAULT_STORE_FORMAT})",
    )
    p.add_argument(
        "--sync",
        choices=tuple(SYNC_LEVELS),
        default=DEFAULT_SYNC,
        help=f"with --store: full survives power loss, normal and off a crash of the broker process (default: {DEFAULT_SYNC})",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port, logged at -v)",
    )
    p.add_argument(
        "--metrics-host",
        default=DEFAULT_METRICS_HOST,
        metavar="HOST",
        help=f"address the metrics server listens on (default: {DEFAULT_METRICS_HOST})",
    )
    p.add_argument(
        "--shards",
        type=_count("--shards", MAX_SHARDS),
        default=1,
        metavar="N",
        help=(
            "run N independent brokers, one process each: shard K binds each endpoint's tcp port + K "
            "(ipc: path.K) and uses --store PATH.K; clients and workers take the list (default: 1)"
        ),
    )
    p.add_argument(
        "requests_addr", metavar="REQUESTS_ADDR", help="where clients send requests (ROUTER), e.g. tcp://*:5555"
    )
    p.add_argument("workers_addr", metavar="WORKERS_ADDR", help="where workers ask for jobs (ROUTER)")
    p.add_argument("answers_addr", metavar="ANSWERS_ADDR", help="where workers push answers (PULL)")

    p = sub.add_parser(
        "worker",
        help="run workers of a Worker or ReqWorker subclass",
        description="Run instances of a fastbroker.Worker (DEALER, FBW02 or FBW01) or fastbroker.ReqWorker (REQ/PUSH) subclass until SIGINT or SIGTERM.",
        parents=[verbose, curve],
    )
    p.add_argument("worker_class", metavar="MODULE:CLASS", help="the worker subclass, e.g. mypkg.jobs:Resize")
    p.add_argument(
        "requests_addr",
        metavar="WORKERS_ADDR",
        help=(
            "the broker's workers endpoint, or several brokers' comma-separated (a Worker serves them all, one "
            "credit for all; a ReqWorker process i serves broker i mod N)"
        ),
    )
    p.add_argument(
        "answers_addr",
        metavar="ANSWERS_ADDR",
        nargs="?",
        default=None,
        help="the broker's answers endpoint (ReqWorker subclasses only; with several brokers, theirs in the same order)",
    )
    p.add_argument("-p", "--processes", type=_positive, default=1, help="worker processes to run (default: 1)")
    p.add_argument(
        "--cpu-affinity",
        action="store_true",
        help="pin each worker process to one CPU of its own (the CPUs this command may use, in order; "
        "round again past the last), for large servers; off by default",
    )
    p.add_argument(
        "--credit",
        type=_count("credit", MAX_CREDIT),
        default=None,
        metavar="N",
        help="jobs one Worker process takes at once, in up to N threads (default: 1)",
    )
    p.add_argument(
        "--prefetch",
        type=_count("prefetch", MAX_CREDIT, low=0),
        default=None,
        metavar="N",
        help="jobs one Worker process may hold beyond --credit, waiting for a thread (default: 0); "
        "their attempt timeout runs while they wait",
    )
    p.add_argument(
        "--protocol",
        type=int,
        choices=(1, 2),
        default=None,
        help="worker protocol: 2 (FBW02, many jobs per message; the default) or 1 (FBW01, one job "
        "per message); a FBW02 worker falls back to FBW01 by itself against a broker without FBW02",
    )
    p.add_argument(
        "--heartbeat",
        type=_heartbeat,
        default=None,
        metavar="SECONDS",
        help=f"seconds between heartbeats (Worker only; default: {DEFAULT_HEARTBEAT})",
    )
    p.add_argument(
        "--liveness",
        type=_count("liveness", MAX_LIVENESS, MIN_LIVENESS),
        default=None,
        metavar="N",
        help=f"heartbeats of broker silence before reconnecting (Worker only; default: {DEFAULT_LIVENESS})",
    )

    p = sub.add_parser(
        "submit",
        help="send a request (FBC01) and print its answer",
        description=(
            "Send PAYLOAD (or stdin, when PAYLOAD is - or left out) to the broker's requests endpoint and write the "
            "answer's bytes to stdout. Exit status: 0 ok, 1 failed (the worker's error on stderr), 2 bad input, "
            "3 timed out, 4 cancelled, 5 rejected, 6 no outcome within --wait (the request goes on; -v prints its id)."
        ),
        parents=[verbose, curve],
    )
    p.add_argument(
        "address",
        metavar="ADDR",
        help="the broker's requests endpoint, e.g. tcp://host:5555, or several brokers' comma-separated",
    )
    p.add_argument("payload", metavar="PAYLOAD", nargs="?", default="-", help="the request (default: - reads stdin)")
    p.add_argument(
        "-T",
        "--timeout",
        type=_request_timeout,
        default=None,
        metavar="SECONDS",
        help="seconds an attempt may take (default: the broker's)",
    )
    p.add_argument(
        "-t", "--tries", type=_request_tries, default=None, metavar="N", help="most attempts (default: the broker's)"
    )
    p.add_argument(
        "-w",
        "--wait",
        type=_wait,
        default=DEFAULT_SUBMIT_WAIT,
        metavar="SECONDS",
        help=f"seconds to wait for the outcome (default: {DEFAULT_SUBMIT_WAIT:g})",
    )

    p = sub.add_parser(
        "status",
        help="print what the broker says about a request id",
        description="Print the state of a request: queued, running (attempt N of M), done, or unknown (exit 1). Exit 6 if the broker does not answer within --wait.",
        parents=[verbose, curve],
    )
    p.add_argument(
        "address", metavar="ADDR", help="the broker's requests endpoint, or several brokers' comma-separated"
    )
    p.add_argument("request_id", metavar="ID", type=_request_id, help="the request id: 32 hex digits or a uuid")
    _add_query_wait(p)

    p = sub.add_parser(
        "cancel",
        help="cancel a request by id",
        description=(
            "Cancel a request and print what the broker answered: cancelled (exit 0); the outcome the request already "
            "had (ok, failed..., exit 1); unknown (exit 1). Exit 6 if the broker does not answer within --wait."
        ),
        parents=[verbose, curve],
    )
    p.add_argument(
        "address", metavar="ADDR", help="the broker's requests endpoint, or several brokers' comma-separated"
    )
    p.add_argument("request_id", metavar="ID", type=_request_id, help="the request id: 32 hex digits or a uuid")
    _add_query_wait(p)

    p = sub.add_parser(
        "stats",
        help="print the broker's counters, gauges and latency histogram",
        description=(
            "Ask the broker for its figures (the FBC01 STATS command) and print them as a table, or with --json "
            "as one JSON object. Exit 6 if the broker does not answer within --wait."
        ),
        parents=[verbose, curve],
    )
    p.add_argument(
        "address", metavar="ADDR", help="the broker's requests endpoint, or several brokers' comma-separated"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (the names as the broker sends them)")
    _add_query_wait(p)

    p = sub.add_parser(
        "dead",
        help="list or requeue the requests the broker gave up on (the dead-letter)",
        description=(
            "The dead-letter: FBC01/FBC02 requests whose last try ended FAILED or TIMED_OUT, kept by the broker "
            "with their payload (and in its store) until requeued or past --retention / --retention-memory."
        ),
        parents=[verbose],
    )
    dead_sub = p.add_subparsers(dest="dead_command", metavar="DEAD_COMMAND", parser_class=_Parser)
    dead_sub.required = True
    c = dead_sub.add_parser(
        "list",
        help="print how many requests are dead and the oldest of them",
        description=(
            "Print how many requests are dead, then one line per dead request, oldest first: id, outcome and "
            "error, attempts, age, payload size. Exit 6 if the broker does not answer within --wait."
        ),
        parents=[verbose, curve],
    )
    c.add_argument(
        "address", metavar="ADDR", help="the broker's requests endpoint, or several brokers' comma-separated"
    )
    c.add_argument(
        "--limit",
        type=_count("--limit", MAX_DEAD_LIST, 0),
        default=100,
        metavar="N",
        help=f"list at most N (0 to {MAX_DEAD_LIST}; default: 100)",
    )
    c.add_argument("--json", action="store_true", help="print one JSON object")
    _add_query_wait(c)
    c = dead_sub.add_parser(
        "requeue",
        help="queue dead requests again, by id or all",
        description=(
            "Queue dead requests again (same id and payload, every try anew), by id or with --all, and print "
            "what happened to each. Exit 0 if every one was requeued; 1 if one was not dead (its status is "
            "printed), the queue was full, or --all left some dead; 6 if the broker does not answer within --wait. "
            "The new outcome: `fastbroker submit` of the same id, or Client.result(id)."
        ),
        parents=[verbose, curve],
    )
    c.add_argument(
        "address", metavar="ADDR", help="the broker's requests endpoint, or several brokers' comma-separated"
    )
    c.add_argument("request_ids", metavar="ID", type=_request_id, nargs="*", help="request ids: 32 hex digits or uuids")
    c.add_argument("--all", action="store_true", help="every dead request (oldest first, while the queue has room)")
    _add_query_wait(c, per_command=True)

    p = sub.add_parser(
        "keygen",
        help="write a CURVE key pair: NAME.key (public) and NAME.key_secret (secret)",
        description=(
            "Write a CURVE key pair for a broker, worker or client: NAME.key (the public key, to hand out: the "
            "broker's to its peers' --curve-server-key, a peer's into the broker's --authorized-keys directory) and "
            "NAME.key_secret (the secret key, readable by its owner only, for --curve-secret). Never overwrites a file."
        ),
        parents=[verbose],
    )
    p.add_argument("name", metavar="NAME", help="the key files' name, e.g. broker or worker-1")
    p.add_argument(
        "--dir",
        default=".",
        metavar="DIR",
        help="where to write them (created if missing; default: the current directory)",
    )

    p = sub.add_parser(
        "demo", help="run broker, dropping workers and a client; show retries and aborts", parents=[verbose]
    )
    p.add_argument("--jobs", type=_positive, default=24, help="requests to send (default: 24)")
    p.add_argument("--workers", type=_positive, default=3, help="worker processes (default: 3)")
    p.add_argument("--drop-rate", type=_rate, default=0.4, help="share of jobs a worker drops (default: 0.4)")
    p.add_argument("-T", "--timeout", type=_timeout, default=0.3, help="attempt timeout in seconds (default: 0.3)")
    p.add_argument("-t", "--tries", type=_tries, default=3, help="tries per job (default: 3)")
    p.add_argument("--core", choices=CORE_NAMES, default=None, help="broker core")
    p.add_argument("--seed", type=int, default=2010, help="random seed of the dropping workers")
    p = sub.add_parser(
        "store",
        help="inspect a broker's store",
        description="Inspect a store file of `fastbroker broker --store`.",
        parents=[verbose],
    )
    store_sub = p.add_subparsers(dest="store_command", metavar="STORE_COMMAND")
    store_sub.required = True
    c = store_sub.add_parser("check", help="report what a store holds and whether it is sound (read-only)")
    c.add_argument("path", metavar="PATH", help="the store file")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _setup_logging(verbose: int, log_format: Optional[str] = None) -> None:
    # 0: warnings; -v: info (the broker's events, one line each); -vv: debug.
    setup_logging(verbose, log_format or "text")


def _fail(message: str) -> int:
    print(f"fastbroker: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_broker(args: argparse.Namespace) -> int:
    if args.tries is not None and args.timeout is None:
        print(
            "fastbroker: warning: without --timeout, --tries only limits retries after FAILED "
            "reports and lost DEALER workers (attempts never time out)",
            file=sys.stderr,
        )
    if (args.curve_secret is None) != (args.authorized_keys is None):
        return _fail("--curve-secret and --authorized-keys go together: give both or neither")
    if args.shards > 1:
        from fastbroker.server.shards import run_shards

        try:
            return run_shards(args, _run_broker)
        except ConfigError as exc:
            return _fail(str(exc))
    return _run_broker(args)


def _run_broker(args: argparse.Namespace) -> int:
    """One broker, with the options of `args`, until SIGINT or SIGTERM."""
    from fastbroker.server.broker import Broker

    # Only the options given are passed on: Broker keeps its own defaults.
    options = {name: getattr(args, name) for name in ("heartbeat", "liveness") if getattr(args, name) is not None}
    try:
        broker = Broker(
            None,
            args.timeout,
            args.tries,
            args.requests_addr,
            args.workers_addr,
            args.answers_addr,
            core=args.core,
            retention=args.retention,
            retention_bytes=args.retention_memory,
            max_queue=args.max_queue,
            max_extend=args.max_extend,
            max_message=args.max_message,
            curve_secret=args.curve_secret,
            authorized_keys=args.authorized_keys,
            store=args.store,
            sync=args.sync,
            store_format=args.store_format,
            **options,
        )
    except ConfigError as exc:
        return _fail(str(exc))
    metrics = None
    if args.metrics_port is not None:
        from fastbroker.server.metrics import MetricsServer

        try:
            metrics = MetricsServer(broker, args.metrics_port, args.metrics_host)
        except (ConfigError, OSError) as exc:
            broker.close()
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return _fail(f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {detail}")
    install_stop_handlers(broker.stop, broker.wake_fd)
    try:
        broker.run()
    except BrokerError as exc:
        # The store could not be written: stop rather than promise what is not stored.
        print(f"fastbroker: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.set_wakeup_fd(-1)
        # Before the broker: its context cannot end while the metrics' socket is open.
        if metrics is not None:
            metrics.close()
        broker.close()
    return 0


def load_worker_class(spec: str) -> type:
    """Import MODULE:CLASS and check it is a Worker or ReqWorker subclass; ConfigError otherwise."""
    from fastbroker.worker.base import ReqWorker, Worker

    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"expected MODULE:CLASS, got {spec!r}")
    # Like `python -m`, let the user's own modules in the current directory be found.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way
        raise ConfigError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, (Worker, ReqWorker))):
        raise ConfigError(f"{spec} is not a subclass of fastbroker.Worker or fastbroker.ReqWorker")
    return cls


def _check_address(addr: str) -> List[str]:
    """The brokers of ADDR (one, or a comma-separated list); ConfigError if one is not a
    ZeroMQ address."""
    from fastbroker.addresses import split_addresses

    brokers = split_addresses(addr)
    for one in brokers:
        if "://" not in one:
            raise ConfigError(f"not a ZeroMQ address: {one!r} (expected e.g. tcp://host:port or ipc:///path)")
    return brokers


class _Brokers:
    """The DEALER sockets of the one-shot client commands (status, cancel, stats, dead):
    one per broker of ADDR, opened when first used, closed on exit."""

    def __init__(self, args: argparse.Namespace) -> None:
        import zmq

        self.addresses = _check_address(args.address)
        self.curve = _curve_keys(args)
        self.wait: float = args.wait
        self.context = zmq.Context(1)
        self.sockets: Dict[int, Any] = {}

    def __enter__(self) -> _Brokers:
        return self

    def __exit__(self, *exc: object) -> None:
        for socket in self.sockets.values():
            socket.close(0)
        self.context.term()

    def socket(self, shard: int) -> Any:
        """The DEALER connected to broker `shard`."""
        from fastbroker.client.sync import connect_dealer

        if shard not in self.sockets:
            self.sockets[shard] = connect_dealer(self.context, self.addresses[shard], self.curve)
        return self.sockets[shard]

    def ask(self, shard: int, message: List[bytes], request_id: bytes) -> Optional[Reply]:
        """Send `message` to broker `shard`; its first reply about `request_id` other
        than ACCEPTED, or None after --wait."""
        from fastbroker.client.protocol import request_once

        return request_once(self.socket(shard), message, request_id, self.wait)

    def search(
        self, message: List[bytes], request_id: bytes, final: Optional[Sequence[bytes]] = None
    ) -> Tuple[Optional[Reply], List[str]]:
        """Ask the brokers about an id in order from its home (client/shards.py) until one
        answers with a reply of a kind in `final` (None: any but UNKNOWN): (that reply, or
        else the first other than UNKNOWN, or an UNKNOWN, or None; the brokers that said
        nothing)."""
        from fastbroker.client.shards import search_order
        from fastbroker.protocol import R_UNKNOWN

        found: Optional[Reply] = None
        silent = []
        for shard in search_order(request_id, len(self.addresses)):
            reply = self.ask(shard, message, request_id)
            if reply is None:
                silent.append(self.addresses[shard])
                continue
            if found is None or found.kind == R_UNKNOWN:
                found = reply
            if (reply.kind != R_UNKNOWN) if final is None else (reply.kind in final):
                found = reply
                break
        return found, silent

    def no_answer(self, silent: Sequence[str]) -> int:
        print(f"fastbroker: no answer from {', '.join(silent)} within {self.wait:g} s", file=sys.stderr)
        return EXIT_NO_REPLY


def _curve_keys(args: argparse.Namespace) -> Optional[CurveKeys]:
    """The CURVE client keys of --curve-server-key and --curve-secret (None without
    them); ConfigError for one without the other or a bad key file."""
    from fastbroker.security import client_keys

    if (args.curve_server_key is None) != (args.curve_secret is None):
        raise ConfigError("--curve-server-key and --curve-secret go together: give both or neither")
    return client_keys(args.curve_server_key, args.curve_secret)


def cmd_worker(args: argparse.Namespace) -> int:
    from fastbroker.worker.base import ReqWorker
    from fastbroker.worker.pool import run_pool

    options = {
        name: getattr(args, name)
        for name in ("credit", "prefetch", "heartbeat", "liveness", "protocol")
        if getattr(args, name) is not None
    }
    try:
        # Checked here, once, so that a bad key file is one line and exit 2 before any
        # process starts; each worker reads the files again when it is built.
        if _curve_keys(args) is not None:
            curve = {"curve_server_key": args.curve_server_key, "curve_secret": args.curve_secret}
        else:
            curve = {}
        cls = load_worker_class(args.worker_class)
        brokers = _check_address(args.requests_addr)
        answers = None if args.answers_addr is None else _check_address(args.answers_addr)
        if issubclass(cls, ReqWorker):
            if args.answers_addr is None:
                raise ConfigError(f"ANSWERS_ADDR is required: {args.worker_class} is a ReqWorker (REQ/PUSH) subclass")
            if options:
                given = ", ".join(f"--{name}" for name in options)
                raise ConfigError(f"{given}: only for fastbroker.Worker subclasses; {args.worker_class} is a ReqWorker")
        # Both classes take the key files through configure().
        # A Worker serves every broker of the list from each process (one credit for
        # all); a ReqWorker speaks to one broker, so process i takes broker i mod N.
        requests: Union[str, List[str]] = brokers if issubclass(cls, ReqWorker) else ",".join(brokers)
        return run_pool(cls, requests, answers, args.processes, {**options, **curve}, args.cpu_affinity)
    except ConfigError as exc:
        return _fail(str(exc))


def _read_payload(text: str) -> bytes:
    if text == "-":
        return sys.stdin.buffer.read()
    return os.fsencode(text)


def cmd_submit(args: argparse.Namespace) -> int:
    import zmq

    from fastbroker.client.outcomes import Rejected, TaskCancelled, TaskFailed, TaskTimedOut
    from fastbroker.client.sync import Client

    try:
        _check_address(args.address)
        _curve_keys(args)  # errors before reading stdin
        payload = _read_payload(args.payload)
        context = zmq.Context(1)
        try:
            client = Client(
                args.address,
                context,
                timeout=args.timeout,
                tries=args.tries,
                curve_server_key=args.curve_server_key,
                curve_secret=args.curve_secret,
            )
        except BaseException:
            context.term()
            raise
    except ConfigError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot read the payload: {exc}")
    try:
        future = client.submit(payload)
        request_id = future.request_id.hex()
        if args.verbose + args.sub_verbose:
            print(f"fastbroker: request id {request_id}", file=sys.stderr, flush=True)
        try:
            answer = future.result(args.wait)
        except TaskFailed as exc:
            print(f"fastbroker: failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except TaskTimedOut:
            print(f"fastbroker: timed out: request {request_id} ran out of tries", file=sys.stderr)
            return EXIT_TIMED_OUT
        except TaskCancelled:
            print(f"fastbroker: cancelled: request {request_id}", file=sys.stderr)
            return EXIT_CANCELLED
        except Rejected as exc:
            print(f"fastbroker: {exc}", file=sys.stderr)
            return EXIT_REJECTED
        except (TimeoutError, concurrent.futures.TimeoutError):  # one class from 3.11 on
            print(f"fastbroker: no outcome within {args.wait:g} s; request {request_id} may still run", file=sys.stderr)
            return EXIT_NO_REPLY
        out = sys.stdout.buffer
        out.write(answer)
        out.flush()
        return EXIT_OK
    finally:
        client.close()
        context.term()


def cmd_status(args: argparse.Namespace) -> int:
    from fastbroker.client.protocol import status_message

    try:
        with _Brokers(args) as brokers:
            reply, silent = brokers.search(status_message(args.request_id), args.request_id)
            if reply is None or reply.status is None or (silent and reply.status.state == "unknown"):
                return brokers.no_answer(silent)
    except ConfigError as exc:
        return _fail(str(exc))
    print(reply.status.describe())
    return EXIT_OK if reply.status.state != "unknown" else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from fastbroker.client.protocol import cancel_message, describe_outcome
    from fastbroker.protocol import R_CANCELLED, R_UNKNOWN

    try:
        with _Brokers(args) as brokers:
            reply, silent = brokers.search(cancel_message(args.request_id), args.request_id)
            if reply is None or (silent and reply.kind == R_UNKNOWN):
                return brokers.no_answer(silent)
    except ConfigError as exc:
        return _fail(str(exc))
    if reply.kind == R_CANCELLED:
        print("cancelled")
        return EXIT_OK
    if reply.is_outcome:
        print(f"already finished: {describe_outcome(reply)}")
    else:
        print(describe_outcome(reply))
    return 1


def cmd_stats(args: argparse.Namespace) -> int:
    from fastbroker.server.metrics import format_stats, request_stats

    try:
        with _Brokers(args) as brokers:
            each = []
            for shard, address in enumerate(brokers.addresses):
                try:
                    figures = request_stats(brokers.socket(shard), args.wait)
                except ValueError as exc:
                    print(f"fastbroker: malformed STATS reply from {address}: {exc}", file=sys.stderr)
                    return 1
                if figures is None:
                    return brokers.no_answer([address])
                each.append(figures)
    except ConfigError as exc:
        return _fail(str(exc))
    if len(each) == 1:
        print(json.dumps(each[0]) if args.json else format_stats(each[0]))
        return EXIT_OK
    total = {name: sum(figures.get(name, 0) for figures in each) for name in each[0]}
    if args.json:
        shards = [{"address": a, "figures": f} for a, f in zip(brokers.addresses, each)]
        print(json.dumps({"total": total, "shards": shards}))
    else:
        print(f"all {len(each)} brokers")
        print(format_stats(total))
        for address, figures in zip(brokers.addresses, each):
            print(f"\n{address}")
            print(format_stats(figures))
    return EXIT_OK


def cmd_dead(args: argparse.Namespace) -> int:
    from fastbroker.client.protocol import (
        dead_message,
        describe_outcome,
        new_request_id,
        requeue_all_message,
        requeue_message,
    )
    from fastbroker.client.shards import merge_dead
    from fastbroker.protocol import R_DEAD, R_REJECTED, R_REQUEUED, R_UNKNOWN

    if args.dead_command == "requeue" and bool(args.request_ids) == bool(args.all):
        return _fail("dead requeue: give request ids or --all (not both)")
    try:
        brokers = _Brokers(args)
    except ConfigError as exc:
        return _fail(str(exc))
    with brokers:
        if args.dead_command == "list":
            answers = []
            for shard, address in enumerate(brokers.addresses):
                rid = new_request_id()
                reply = brokers.ask(shard, dead_message(rid, args.limit), rid)
                if reply is None or reply.kind != R_DEAD:
                    return brokers.no_answer([address])
                answers.append(reply.info)
            dead = merge_dead(answers, args.limit)
            if args.json:
                listed = [dict(d._asdict(), request_id=d.request_id.hex()) for d in dead.requests]
                print(json.dumps({"total": dead.total, "requests": listed}))
            else:
                print(f"{dead.total} dead request{'s' if dead.total != 1 else ''}")
                for one in dead.requests:
                    print(one.describe())
            return EXIT_OK
        if args.all:
            requeued = left = 0
            for shard, address in enumerate(brokers.addresses):
                rid = new_request_id()
                reply = brokers.ask(shard, requeue_all_message(rid), rid)
                if reply is None or reply.kind != R_REQUEUED:
                    return brokers.no_answer([address])
                requeued += reply.info.requeued
                left += reply.info.dead
            print(f"requeued {requeued}, still dead {left}")
            return EXIT_OK if left == 0 else 1
        status = EXIT_OK
        for rid in args.request_ids:
            # Each broker from the id's home on, until one requeues it or refuses.
            reply, silent = brokers.search(requeue_message(rid), rid, (R_REQUEUED, R_REJECTED))
            if reply is None or (silent and reply.kind == R_UNKNOWN):
                return brokers.no_answer(silent)
            if reply.kind == R_REQUEUED:
                print(f"{rid.hex()}: requeued")
                continue
            status = 1
            if reply.kind == R_REJECTED:
                print(f"{rid.hex()}: not requeued, {describe_outcome(reply)}")
            else:
                print(f"{rid.hex()}: not dead: {describe_outcome(reply)}")
        return status


def cmd_store(args: argparse.Namespace) -> int:
    from fastbroker.server.store_files import check_store

    try:
        report = check_store(args.path)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(report._asdict()))
    else:
        print(f"store {report.path}: {report.format} version {report.version}, {report.bytes} bytes")
        print(f"queued: {report.queued} (never sent to a worker)")
        print(f"in flight: {report.in_flight} (sent at least once, not finished)")
        print(f"finished: {report.finished} (outcomes kept for RESULT)")
        print(f"dead: {report.dead} (of the finished: FAILED or TIMED_OUT, payload kept for requeue)")
        if report.torn:
            print(f"left out: {report.torn} byte(s) of an unfinished last write (never acknowledged)")
        print("sound" if report.sound else "NOT SOUND: " + "; ".join(report.problems))
    return 0 if report.sound else 1


def cmd_keygen(args: argparse.Namespace) -> int:
    from fastbroker.security import create_key_pair

    try:
        public, secret = create_key_pair(args.dir, args.name)
    except ConfigError as exc:
        return _fail(str(exc))
    print(public)
    print(secret)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fastbroker.demo import run_demo

    return run_demo(
        jobs=args.jobs,
        workers=args.workers,
        drop_rate=args.drop_rate,
        timeout=args.timeout,
        tries=args.tries,
        core=args.core,
        seed=args.seed,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(
        args.verbose + getattr(args, "sub_verbose", 0), getattr(args, "sub_log_format", None) or args.log_format
    )
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    commands = {
        "broker": cmd_broker,
        "worker": cmd_worker,
        "demo": cmd_demo,
        "submit": cmd_submit,
        "status": cmd_status,
        "cancel": cmd_cancel,
        "keygen": cmd_keygen,
        "store": cmd_store,
        "stats": cmd_stats,
        "dead": cmd_dead,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`fastbroker stats ADDR | head`): not an
        # error to report. Point stdout at /dev/null so the interpreter's final flush
        # does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


__all__: List[str] = ["main", "build_parser", "load_worker_class"]
