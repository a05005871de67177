"""The suite's fixtures (only fixtures and pytest hooks: the rigs, helpers and
constants they use are in rigs.py, and no module imports this one).

Tests get the core from the `core` fixture and never import an implementation
themselves: which core is live is decided once, by FASTBROKER_PURE, for the whole run
(`make test` runs the suite once per core). A test marked ``compiled_only`` (it needs
the compiled core, e.g. next to the pure one) runs in the compiled run and is skipped
in the pure run with the marker's reason.
"""

from __future__ import annotations

import os
import threading

import pytest
import zmq

import fastbroker
from fastbroker import _select
from rigs import TESTS_DIR, CRig, FakeBroker, Processes, Rig, WRig

from workers_for_tests import GATE_DIR_ENV, GATE_ENV, LOG_ENV, CancelProbe

REQUIRE_COMPILED_ENV = "FASTBROKER_REQUIRE_COMPILED"

THREAD_JOIN_WAIT = 20.0
"""Bound of the join of each worker thread the `threads` fixture started."""
FAKE_WORKER_JOIN_WAIT = 10.0
"""Bound of the join of the `fake` fixture's worker thread."""


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
    for what, (compiled, _) in _select.TWINS.items():
        if os.environ.get(REQUIRE_COMPILED_ENV) == "1" and _select.twin(what)[1] != "compiled":
            pytest.exit(
                f"{REQUIRE_COMPILED_ENV}=1 but the {what} is the pure one: "
                f"the compiled extension {compiled} did not load",
                returncode=3,
            )


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("compiled_only")
    if marker is not None and fastbroker.core_name != "compiled":
        pytest.skip(marker.kwargs.get("reason", "needs the compiled core"))


# The skips this suite expects, by the start of their reason. Any other skip fails the
# run: a test skipped for a reason nobody chose (a missing server, a marker file on one
# machine) is a test CI never ran, while the run looked green.
EXPECTED_SKIPS = (
    "needs the compiled core",  # compiled_only in the pure run
    "differential test of both cores runs in the compiled run",  # compiled_only, its own reason
    "FASTBROKER_PURE is set",  # test_core_api: the compiled import check, in the pure run
    "compiled core unavailable under FASTBROKER_PURE=1",  # test_core_api, pure run without a build
    "docs/CLI.md was generated with Python",  # argparse lays out --help differently on another Python
    "needs /proc",  # test_worker_overhead on a system without /proc
)
_unexpected_skips: list = []


def pytest_runtest_logreport(report):
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if reason.startswith("Skipped: "):
        reason = reason[len("Skipped: ") :]
    if not reason.startswith(EXPECTED_SKIPS):
        _unexpected_skips.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("unexpected skips (not in conftest.EXPECTED_SKIPS): the run fails")
        for nodeid, reason in _unexpected_skips:
            terminalreporter.write_line(f"{nodeid}: {reason}")


# -- the core ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def core():
    """The live core module (compiled or pure)."""
    return _select.core


@pytest.fixture(scope="session")
def core_name() -> str:
    return fastbroker.core_name


@pytest.fixture
def ctx():
    """A ZeroMQ context destroyed with linger 0 at teardown."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _rigs(cls, core, ctx):
    """Yield a factory of `cls` rigs on the live core; close every rig it made."""
    rigs = []

    def make(*args, **kwargs):
        rig = cls(core, ctx, *args, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def make_rig(core, ctx):
    """make_rig(timeout=None, tries=None) -> a rigs.Rig on the live core; all closed at teardown."""
    yield from _rigs(Rig, core, ctx)


@pytest.fixture
def make_wrig(core, ctx):
    """make_wrig(**options) -> a rigs.WRig (FBW01 workers) on the live core; all closed at teardown."""
    yield from _rigs(WRig, core, ctx)


@pytest.fixture
def make_crig(core, ctx):
    """make_crig(**options) -> a rigs.CRig (FBW01 workers and FBC01 clients) on the live
    core; all closed at teardown."""
    yield from _rigs(CRig, core, ctx)


# -- processes and threads ----------------------------------------------------------------


@pytest.fixture
def subprocess_env():
    """Environment for child processes: same core choice, tests dir importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def procs(tmp_path, subprocess_env):
    """Starts processes (rigs.Processes); kills all of them (SIGKILL) at teardown, pass or fail."""
    p = Processes(tmp_path, subprocess_env)
    yield p
    p.kill_all()


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


# -- the job log and gates of workers_for_tests ---------------------------------------------


@pytest.fixture
def log_path(tmp_path, monkeypatch):
    """The job log ($FB_TEST_LOG) for jobs in this process and in children started
    after. (Modules that pass the log to their children themselves override this.)"""
    path = tmp_path / "jobs.log"
    monkeypatch.setenv(LOG_ENV, str(path))
    return path


@pytest.fixture
def gate(tmp_path, monkeypatch):
    """The file DealerGated workers wait for (``0:gated...`` jobs); opened at teardown
    at the latest, so no worker thread is left waiting."""
    path = tmp_path / "gate"
    monkeypatch.setenv(GATE_ENV, str(path))
    yield path
    path.touch()


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    """(the job log, open_gate(tag)): $FB_TEST_LOG and the gate directory of
    CancelProbe jobs, for jobs in this process and in children."""
    log = tmp_path / "jobs.log"
    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv(LOG_ENV, str(log))
    monkeypatch.setenv(GATE_DIR_ENV, str(gates))

    def open_gate(tag: str) -> None:
        (gates / tag).touch()

    return log, open_gate


@pytest.fixture(params=[2, 1], ids=["FBW02", "FBW01"])
def fake(request, ctx, job_env):
    """(rigs.FakeBroker, the running CancelProbe worker) with credit 1, in each worker
    protocol; the worker has sent READY. Teardown opens every gate the tests use, stops
    and closes the worker."""
    broker = FakeBroker(ctx, request.param)
    # A long silence limit: the fake broker does not heartbeat, and the tests are short.
    worker = CancelProbe(ctx, broker.address, credit=1, heartbeat=1.0, liveness=20, protocol=request.param)
    worker.stop_grace = 0.01
    thread = threading.Thread(target=worker.run, name="cancel-probe-worker", daemon=True)
    thread.start()
    try:
        broker.expect_ready(1)
        yield broker, worker
    finally:
        _, open_gate = job_env
        for tag in ("one", "running", "held"):
            open_gate(tag)
        worker.stop()
        thread.join(FAKE_WORKER_JOIN_WAIT)
        assert not thread.is_alive(), "the worker did not stop"
        worker.close()
