"""The suite fails on a skip whose reason is not in conftest.EXPECTED_SKIPS, and
passes on one that is: a pytest run of a copy of the suite's conftest over one
skipping test, in a temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from rigs import PYTHON, TESTS_DIR

SKIPPING_TEST = """
import pytest

def test_skipped():
    pytest.skip({reason!r})

def test_passes():
    pass
"""


def run_suite(tmp_path, reason: str) -> subprocess.CompletedProcess:
    shutil.copy(TESTS_DIR / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_one.py").write_text(SKIPPING_TEST.format(reason=reason))
    env = {k: v for k, v in os.environ.items() if k != "FASTBROKER_REQUIRE_COMPILED"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_skip_nobody_chose_fails_the_run(tmp_path):
    result = run_suite(tmp_path, "redis-server is not installed")
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "unexpected skips" in result.stdout
    assert "test_one.py::test_skipped: redis-server is not installed" in result.stdout


def test_an_expected_skip_passes(tmp_path):
    result = run_suite(tmp_path, "needs /proc")
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout
