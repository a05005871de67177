"""The crash soak, short (``make chaos`` is the long one; bench/chaos.py): a pool of
worker processes SIGKILLed every 0.1-0.2 s and the broker SIGKILLed and restarted once,
with and without a store, and with two brokers (shards) killed in turn; nothing may be
wrong, lost or answered twice."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JOBS = 400
TIMEOUT = 120.0
"""Bound of one soak (it takes a few seconds)."""


@pytest.mark.parametrize(
    "store, shards", [("--store", 1), ("--no-store", 1), ("--store", 2)], ids=["store", "no-store", "store-2-shards"]
)
def test_short_chaos_loses_nothing(store, shards, subprocess_env, core_name):
    kills = 2 if shards > 1 else 1  # each shard once
    options = ["--jobs", str(JOBS), "--broker-kills", str(kills), store, "--max-seconds", "60", "--core", core_name]
    options += ["--shards", str(shards)]
    result = subprocess.run(
        [sys.executable, "-m", "bench.chaos", *options],
        cwd=REPO,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    line = re.search(r"correct (\d+), wrong (\d+), lost (\d+), failed (\d+), answered twice (\d+)", result.stdout)
    assert line, result.stdout
    assert [int(x) for x in line.groups()] == [JOBS, 0, 0, 0, 0], result.stdout
    killed = re.search(r"worker kills (\d+), broker kills (\d+)", result.stdout)
    assert killed and int(killed.group(2)) == kills, result.stdout
