"""A signal the kernel delivers to another thread than the main one still stops a Worker
whose run() holds the main thread (as the CLI's does), on the session under test.

The compiled session runs its loop on a thread of its own while run() waits in the main
thread; Python runs signal handlers only in the main thread, and a signal delivered to
another thread only sets a flag. So run() waits in slices, and the session's own
threads block the usual signals (the kernel then picks another thread). Here the signal
is raised in a plain helper thread of the test, which blocks nothing: the handler must
still run and stop the worker. Real sockets: a FakeBroker (rigs) on tcp 127.0.0.1.
"""

from __future__ import annotations

import signal
import threading
import time

from fastbroker import Worker
from rigs import FAKE_WAIT, FakeBroker


class Idle(Worker):
    def process(self, data: bytes) -> bytes:
        return data


def test_a_signal_raised_in_another_thread_stops_run_in_the_main_thread(ctx):
    assert threading.current_thread() is threading.main_thread()
    broker = FakeBroker(ctx, 2)
    worker = Idle(ctx, broker.address, heartbeat=1.0, liveness=20)
    handled = []
    rescued = []  # the watchdog had to stop the worker

    def handler(signum, frame):
        handled.append(signum)
        worker.stop()

    def raise_elsewhere() -> None:
        broker.expect_ready(1)  # connected: run() is waiting in the main thread
        signal.raise_signal(signal.SIGUSR1)  # delivered to this thread, which blocks nothing

    def watchdog() -> None:  # bounds the test if the handler never runs
        deadline = time.monotonic() + FAKE_WAIT
        while not handled and time.monotonic() < deadline:
            time.sleep(0.01)  # the pace of a bounded wait for the handler
        if not handled:
            rescued.append(True)
            worker.stop()

    previous = signal.signal(signal.SIGUSR1, handler)
    old_fd = signal.set_wakeup_fd(worker.wake_fd, warn_on_full_buffer=False)  # as the CLI does
    runner = threading.Thread(target=raise_elsewhere, name="raises-the-signal")
    guard = threading.Thread(target=watchdog, name="watchdog", daemon=True)
    try:
        runner.start()
        guard.start()
        started = time.monotonic()
        worker.run()
        took = time.monotonic() - started
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, previous)
        runner.join(FAKE_WAIT)
        worker.close()
    assert not rescued, "the handler did not run while run() waited: the watchdog stopped the worker"
    assert handled == [signal.SIGUSR1]
    assert took < FAKE_WAIT
