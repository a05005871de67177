"""The worker pool's restarts (``fastbroker worker --processes N``, issue 18 part 1): a
child that was serving, or was killed from outside, is restarted at once; back-off is
for a child that keeps failing right after it starts; each restart says why."""

from __future__ import annotations

import os
import signal

import pytest

from fastbroker.supervisor import CRASH_LOOP_WINDOW, RESTART_DELAY, RESTART_DELAY_MAX, restart_policy
from rigs import descendants, wait_until

WAIT = 20.0
"""Bound of each wait for a child to be restarted (a fork and an import: well under it)."""
KILLS = 4


@pytest.mark.parametrize(
    ("exitcode", "ran", "delay", "expected"),
    [
        # Killed from outside, however soon: at once, and the back-off starts afresh.
        (-signal.SIGKILL, 0.1, 4.0, (0.0, RESTART_DELAY, "killed by SIGKILL")),
        (-signal.SIGTERM, 0.1, 1.0, (0.0, RESTART_DELAY, "killed by SIGTERM")),
        # It had been serving: at once.
        (1, CRASH_LOOP_WINDOW + 1, 4.0, (0.0, RESTART_DELAY, "exit status 1")),
        (-signal.SIGSEGV, CRASH_LOOP_WINDOW, 1.0, (0.0, RESTART_DELAY, "killed by SIGSEGV")),
        # Failing right after it starts, of itself: back-off, doubling up to the cap.
        (1, 0.2, RESTART_DELAY, (RESTART_DELAY, 2 * RESTART_DELAY, "exit status 1 0.2 s after it started")),
        (-signal.SIGSEGV, 0.0, RESTART_DELAY_MAX, (RESTART_DELAY_MAX, RESTART_DELAY_MAX, "killed by SIGSEGV")),
    ],
)
def test_restart_policy_follows_the_cause(exitcode, ran, delay, expected):
    wait, next_delay, cause = restart_policy(exitcode, ran, delay)
    assert (wait, next_delay) == expected[:2]
    assert cause.startswith(expected[2]), cause


def test_a_child_killed_again_and_again_is_restarted_at_once_each_time(procs, tmp_path):
    # No broker is needed: a worker process runs (and reconnects) without one.
    pool = procs.start(
        ["-v", "worker", "workers_for_tests:PidWorker", f"ipc://{tmp_path}/wrk", "--processes", "2"], "pool"
    )
    children = wait_until(
        lambda: (lambda found: len(found) == 2 and found)(set(descendants(pool.pid))),
        timeout=WAIT,
        message=f"the pool's two children\n{procs.output()}",
    )
    for kill in range(1, KILLS + 1):
        victim = min(children)
        os.kill(victim, signal.SIGKILL)
        children = wait_until(
            lambda: (lambda found: len(found) == 2 and victim not in found and found)(set(descendants(pool.pid))),
            timeout=WAIT,
            message=f"kill {kill}: a new child for pid {victim}\n{procs.output()}",
        )
    err = pool.stderr_path.read_text()
    assert err.count("(killed by SIGKILL, after") == KILLS, err
    assert err.count("restarting at once") == KILLS, err
    assert "back-off" not in err, err
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(WAIT) == 0, procs.output()
