"""Shared fixtures. Tests get the core from the `core` fixture and never import an
implementation themselves: which core is live is decided once, by FASTBROKER_PURE,
for the whole run (`make test` runs the suite once per core)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import zmq

import fastbroker
from fastbroker import _select

REQUIRE_COMPILED_ENV = "FASTBROKER_REQUIRE_COMPILED"
TESTS_DIR = Path(__file__).resolve().parent


THREAD_JOIN_WAIT = 20.0
"""Bound of the join of each worker thread the `threads` fixture started."""


def pytest_report_header(config):
    return f"fastbroker core: {fastbroker.core_name} ({_select.core.__file__})"


def pytest_sessionstart(session):
    # A missing build must fail the compiled run loudly, not quietly test the pure core.
    if os.environ.get(REQUIRE_COMPILED_ENV) == "1" and fastbroker.core_name != "compiled":
        pytest.exit(
            f"{REQUIRE_COMPILED_ENV}=1 but the live core is {fastbroker.core_name!r}: "
            "the compiled extension did not load",
            returncode=3,
        )


@pytest.fixture(scope="session")
def core():
    """The live core module (compiled or pure)."""
    return _select.core


@pytest.fixture(scope="session")
def core_name() -> str:
    return fastbroker.core_name


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01, message: str = "condition"):
    """Poll `predicate` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def subprocess_env():
    """Environment for child processes: same core choice, tests dir importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


@pytest.fixture
def procs(tmp_path, subprocess_env):
    """Starts processes; kills all of them (SIGKILL) at teardown, pass or fail."""
    from workers_for_tests import Processes

    p = Processes(tmp_path, subprocess_env)
    yield p
    p.kill_all()


@pytest.fixture
def ctx():
    """A ZeroMQ context destroyed with linger 0 at teardown."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def threads():
    """Runs workers in threads: call with a worker (anything with run/stop/close); it is
    stopped, joined (bounded) and closed at teardown."""
    started: list = []

    def start(worker):
        thread = threading.Thread(target=worker.run, name=f"worker-{type(worker).__name__}")
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, _ in started:
        worker.stop()
    for worker, thread in started:
        thread.join(THREAD_JOIN_WAIT)
        worker.close()
