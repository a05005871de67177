"""The comparison tools of bench/ (issue 16 parts 4 and 5): pytest-benchmark's save and
compare, as ``make bench-compare`` uses them, and bench/plot.py's chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(args, tmp_path, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def test_save_then_compare_a_run_as_make_bench_compare_does(tmp_path, subprocess_env):
    env = dict(subprocess_env, FASTBROKER_BENCH_N="200", FASTBROKER_BENCH_ROUNDS="1")
    storage = f"file://{tmp_path / 'runs'}"
    common = ["-m", "pytest", "bench/test_core_ops.py", "-k", "test_enqueue and compiled", "-p", "no:cacheprovider"]
    common += ["--benchmark-only", f"--benchmark-storage={storage}"]
    first = run([*common, "--benchmark-autosave"], tmp_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    saved = list((tmp_path / "runs").glob("*/*.json"))
    assert len(saved) == 1, saved
    second = run(
        [*common, "--benchmark-autosave", "--benchmark-compare", "--benchmark-compare-fail=median:100000%"],
        tmp_path,
        env,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Comparing against benchmarks from" in second.stdout + second.stderr
    assert len(list((tmp_path / "runs").glob("*/*.json"))) == 2


def test_plot_draws_jobs_per_second_and_cpu_per_job(tmp_path):
    data = {
        "benchmarks": [
            {"group": "user-path", "name": "a", "param": None, "extra_info": {"jobs_per_s": 12000}},
            {"group": "user-path", "name": "b", "param": "fbc01", "extra_info": {"jobs_per_s": 7000}},
            {
                "group": "peers",
                "name": "c",
                "param": "celery",
                "extra_info": {"jobs_per_s": 900, "cpu_us_per_job": {"client": 100, "server": 50}},
            },
            {"group": "core", "name": "d", "param": "compiled", "extra_info": {}},  # no jobs/s: left out
        ]
    }
    source = tmp_path / "run.json"
    source.write_text(json.dumps(data))
    result = run(["-m", "bench.plot", str(source), "-o", str(tmp_path / "chart.png"), "--title", "t"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 bars" in result.stdout
    assert (tmp_path / "chart.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_refuses_a_file_without_jobs_per_second_in_one_line(tmp_path):
    source = tmp_path / "core.json"
    source.write_text(json.dumps({"benchmarks": [{"group": "core", "name": "x", "extra_info": {}}]}))
    for args in ([str(source)], [str(tmp_path / "missing.json")]):
        result = run(["-m", "bench.plot", *args], tmp_path)
        assert result.returncode == 2, result
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_client_wire_compares_both_wires_with_right_answers(tmp_path, subprocess_env):
    # bench/client_wire.py checks every answer of every map; a figure per wire means
    # both ran to the end.
    result = run(["-m", "bench.client_wire", "--jobs", "300", "--rounds", "1"], tmp_path, subprocess_env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["compiled", "pure"], result.stdout
    assert all("jobs/s" in line and "us/job" in line for line in lines), result.stdout


def test_client_wire_refuses_bad_arguments_without_a_traceback(tmp_path):
    result = run(["-m", "bench.client_wire", "--jobs", "0"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_async_client_bench_measures_each_way_with_right_answers(tmp_path, subprocess_env):
    # bench/async_client.py checks every answer of every way; a figure per way means
    # each ran to the end.
    result = run(["-m", "bench.async_client", "--jobs", "300", "--rounds", "1"], tmp_path, subprocess_env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["sync map", "async map", "async gather"], result.stdout
    assert all("jobs/s" in line and "us/job" in line for line in lines), result.stdout


def test_async_client_bench_refuses_bad_arguments_without_a_traceback(tmp_path):
    result = run(["-m", "bench.async_client", "--rounds", "0"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_client_threads_bench_measures_each_way_with_right_answers(tmp_path, subprocess_env):
    # bench/client_threads.py checks every answer of every way.
    result = run(["-m", "bench.client_threads", "--jobs", "300", "--rounds", "1", "--no-gc"], tmp_path, subprocess_env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("garbage collector off"), result.stdout
    assert [line.split(":")[0].strip() for line in lines[1:4]] == ["map", "submit", "submit_many"], result.stdout
    assert all("caller's thread" in line and "I/O thread" in line and "collector" in line for line in lines[1:4])
    # Each pending submit holds its future at least, and the book's objects are counted too.
    label, _, tracked = lines[4].partition(": ")
    assert label == "objects tracked per pending submit()" and 1.0 <= float(tracked) < 20, result.stdout


def test_client_threads_bench_refuses_bad_arguments_without_a_traceback(tmp_path):
    result = run(["-m", "bench.client_threads", "--jobs", "0"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
