"""The ``fastbroker`` command: broker, worker and demo sub-commands.

Bad input ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import List, NoReturn, Optional, Sequence

from fastbroker import __version__
from fastbroker._common import (
    DEFAULT_HEARTBEAT,
    DEFAULT_LIVENESS,
    MAX_CREDIT,
    MAX_LIVENESS,
    MIN_LIVENESS,
    ConfigError,
    check_count,
    check_heartbeat,
    check_timeout,
    check_tries,
)
from fastbroker._select import CORE_NAMES
from fastbroker.signals import install_stop_handlers

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the help to read, instead of argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _tries(text: str) -> int:
    try:
        return check_tries(int(text))  # type: ignore[return-value]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, ConfigError) else f"not a whole number: {text!r}")


def _timeout(text: str) -> float:
    try:
        return check_timeout(float(text))  # type: ignore[return-value]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, ConfigError) else f"not a number: {text!r}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _heartbeat(text: str) -> float:
    try:
        return check_heartbeat(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, ConfigError) else f"not a number: {text!r}")


def _count(name: str, high: int, low: int = 1):
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


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastbroker", description="ZeroMQ task broker: workers ask for jobs when ready.")
    parser.add_argument("--version", action="version", version=f"fastbroker {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    # -v is also accepted after the sub-command; both counts add up.
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", dest="sub_verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("broker", help="run a broker", description="Run a broker until SIGINT or SIGTERM.", parents=[verbose])
    p.add_argument("-t", "--tries", type=_tries, default=None, help="attempts per job before the client gets the empty answer (default: unlimited)")
    p.add_argument("-T", "--timeout", type=_timeout, default=None, help="seconds an attempt may take before the job is re-sent (default: none)")
    p.add_argument("--core", choices=CORE_NAMES, default=None, help="broker core (default: compiled unless FASTBROKER_PURE=1)")
    p.add_argument("--heartbeat", type=_heartbeat, default=None, metavar="SECONDS", help=f"seconds between heartbeats to DEALER workers (default: {DEFAULT_HEARTBEAT})")
    p.add_argument("--liveness", type=_count("liveness", MAX_LIVENESS, MIN_LIVENESS), default=None, metavar="N", help=f"heartbeats of silence after which a DEALER worker is dead (default: {DEFAULT_LIVENESS})")
    p.add_argument("requests_addr", metavar="REQUESTS_ADDR", help="where clients send requests (ROUTER), e.g. tcp://*:5555")
    p.add_argument("workers_addr", metavar="WORKERS_ADDR", help="where workers ask for jobs (ROUTER)")
    p.add_argument("answers_addr", metavar="ANSWERS_ADDR", help="where workers push answers (PULL)")

    p = sub.add_parser(
        "worker",
        help="run workers of a Worker or ReqWorker subclass",
        description="Run instances of a fastbroker.Worker (DEALER, FBW01) or fastbroker.ReqWorker (REQ/PUSH) subclass until SIGINT or SIGTERM.",
        parents=[verbose],
    )
    p.add_argument("worker_class", metavar="MODULE:CLASS", help="the worker subclass, e.g. mypkg.jobs:Resize")
    p.add_argument("requests_addr", metavar="WORKERS_ADDR", help="the broker's workers endpoint")
    p.add_argument("answers_addr", metavar="ANSWERS_ADDR", nargs="?", default=None, help="the broker's answers endpoint (ReqWorker subclasses only)")
    p.add_argument("-p", "--processes", type=_positive, default=1, help="worker processes to run (default: 1)")
    p.add_argument("--credit", type=_count("credit", MAX_CREDIT), default=None, metavar="N", help="jobs one Worker process takes at once, each in its own thread (default: 1)")
    p.add_argument("--heartbeat", type=_heartbeat, default=None, metavar="SECONDS", help=f"seconds between heartbeats (Worker only; default: {DEFAULT_HEARTBEAT})")
    p.add_argument("--liveness", type=_count("liveness", MAX_LIVENESS, MIN_LIVENESS), default=None, metavar="N", help=f"heartbeats of broker silence before reconnecting (Worker only; default: {DEFAULT_LIVENESS})")

    p = sub.add_parser("demo", help="run broker, dropping workers and a client; show retries and aborts", parents=[verbose])
    p.add_argument("--jobs", type=_positive, default=24, help="requests to send (default: 24)")
    p.add_argument("--workers", type=_positive, default=3, help="worker processes (default: 3)")
    p.add_argument("--drop-rate", type=_rate, default=0.4, help="share of jobs a worker drops (default: 0.4)")
    p.add_argument("-T", "--timeout", type=_timeout, default=0.3, help="attempt timeout in seconds (default: 0.3)")
    p.add_argument("-t", "--tries", type=_tries, default=3, help="tries per job (default: 3)")
    p.add_argument("--core", choices=CORE_NAMES, default=None, help="broker core")
    p.add_argument("--seed", type=int, default=2010, help="random seed of the dropping workers")
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _fail(message: str) -> int:
    print(f"fastbroker: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_broker(args: argparse.Namespace) -> int:
    from fastbroker.broker import Broker

    if args.tries is not None and args.timeout is None:
        print(
            "fastbroker: warning: without --timeout, --tries only limits retries after FAILED "
            "reports and lost DEALER workers (attempts never time out)",
            file=sys.stderr,
        )
    # Only the options given are passed on: Broker keeps its own defaults.
    options = {name: getattr(args, name) for name in ("heartbeat", "liveness") if getattr(args, name) is not None}
    try:
        broker = Broker(None, args.timeout, args.tries, args.requests_addr, args.workers_addr, args.answers_addr, core=args.core, **options)
    except ConfigError as exc:
        return _fail(str(exc))
    install_stop_handlers(broker.stop, broker.wake_fd)
    try:
        broker.run()
    finally:
        signal.set_wakeup_fd(-1)
        broker.close()
    return 0


def load_worker_class(spec: str) -> type:
    """Import MODULE:CLASS and check it is a Worker or ReqWorker subclass; ConfigError otherwise."""
    from fastbroker.worker import ReqWorker, Worker

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


def _check_address(addr: str) -> None:
    if "://" not in addr:
        raise ConfigError(f"not a ZeroMQ address: {addr!r} (expected e.g. tcp://host:port or ipc:///path)")


def cmd_worker(args: argparse.Namespace) -> int:
    from fastbroker.worker import ReqWorker
    from fastbroker.workerpool import run_pool

    options = {name: getattr(args, name) for name in ("credit", "heartbeat", "liveness") if getattr(args, name) is not None}
    try:
        cls = load_worker_class(args.worker_class)
        for addr in (args.requests_addr, args.answers_addr):
            if addr is not None:
                _check_address(addr)
        if issubclass(cls, ReqWorker):
            if args.answers_addr is None:
                raise ConfigError(f"ANSWERS_ADDR is required: {args.worker_class} is a ReqWorker (REQ/PUSH) subclass")
            if options:
                given = ", ".join(f"--{name}" for name in options)
                raise ConfigError(f"{given}: only for fastbroker.Worker subclasses; {args.worker_class} is a ReqWorker")
        return run_pool(cls, args.requests_addr, args.answers_addr, args.processes, options)
    except ConfigError as exc:
        return _fail(str(exc))


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
    _setup_logging(args.verbose + getattr(args, "sub_verbose", 0))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    commands = {"broker": cmd_broker, "worker": cmd_worker, "demo": cmd_demo}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130



__all__: List[str] = ["main", "build_parser", "load_worker_class"]
