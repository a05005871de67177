"""A bar chart of a ``pytest --benchmark-json`` file: jobs/s of every benchmark that
reports them (``extra_info["jobs_per_s"]``), one panel per benchmark group, and beside
it CPU per job where a benchmark reports it (``extra_info["cpu_us_per_job"]``, a number
or a dict of per-process figures, summed).

    python -m bench.plot RESULTS.json [-o chart.png] [--title TEXT] [--log]

Needs matplotlib (``pip install '.[bench]'``; ``make install`` has it). The file type
follows the output's suffix (.png, .svg, .pdf). ``--log``: logarithmic axes, for figures
that span orders of magnitude (bench/test_peers.py's: RQ's fork per job to fastbroker).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

Row = Tuple[str, float, Optional[float]]  # (label, jobs/s, CPU µs per job or None)


def rows_by_group(data: dict) -> OrderedDict[str, List[Row]]:
    """The benchmarks that report jobs/s, by group, in the file's order."""
    groups: OrderedDict[str, List[Row]] = OrderedDict()
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        rate = info.get("jobs_per_s")
        if not isinstance(rate, (int, float)):
            continue
        cpu = info.get("cpu_us_per_job")
        if isinstance(cpu, dict):
            cpu = sum(v for v in cpu.values() if isinstance(v, (int, float)))
        label = bench.get("param") or bench.get("name", "?").removeprefix("test_")
        groups.setdefault(bench.get("group") or "benchmarks", []).append(
            (str(label), float(rate), float(cpu) if isinstance(cpu, (int, float)) else None)
        )
    return groups


def plot(data: dict, output: Path, title: Optional[str] = None, log: bool = False) -> int:
    """Draw the chart; returns how many bars it has (0: nothing reported jobs/s)."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    groups = rows_by_group(data)
    if not groups:
        return 0
    with_cpu = any(cpu is not None for rows in groups.values() for _, _, cpu in rows)
    columns = 2 if with_cpu else 1
    height = sum(0.4 * len(rows) + 1.0 for rows in groups.values())
    fig, axes = plt.subplots(
        len(groups),
        columns,
        figsize=(6 * columns, max(2.5, height)),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(rows) + 1 for rows in groups.values()]},
    )
    bars = 0
    for (group, rows), row_axes in zip(groups.items(), axes):
        labels = [label for label, _, _ in rows]
        rates = [rate for _, rate, _ in rows]
        ax = row_axes[0]
        ax.barh(labels, rates, color="tab:blue")
        if log:
            ax.set_xscale("log")
        ax.margins(x=0.15)  # room for the figures written after each bar
        ax.invert_yaxis()
        ax.set_title(f"{group}: jobs/s", fontsize=10)
        for y, rate in enumerate(rates):
            ax.annotate(f"{rate:,.0f}", (rate, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        bars += len(rows)
        if with_cpu:
            cpu_ax = row_axes[1]
            if all(cpu is None for _, _, cpu in rows):
                cpu_ax.axis("off")
                cpu_ax.text(0.5, 0.5, f"{group}: CPU per job not measured", ha="center", va="center", fontsize=9)
                continue
            cpus = [cpu or 0.0 for _, _, cpu in rows]
            cpu_ax.barh(labels, cpus, color="tab:orange")
            if log:
                cpu_ax.set_xscale("log")
            cpu_ax.margins(x=0.15)
            cpu_ax.invert_yaxis()
            cpu_ax.set_title(f"{group}: CPU µs per job (all processes)", fontsize=10)
            for y, cpu in enumerate(cpus):
                cpu_ax.annotate(
                    f"{cpu:,.0f}", (cpu, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8
                )
            cpu_ax.set_yticklabels([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return bars


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="a file written by pytest --benchmark-json")
    p.add_argument("-o", "--output", type=Path, default=None, help="the chart (default: the JSON's name, .png)")
    p.add_argument("--title", default=None)
    p.add_argument("--log", action="store_true", help="logarithmic axes (figures spanning orders of magnitude)")
    args = p.parse_args(argv)
    try:
        data: Dict = json.loads(args.json.read_text())
    except (OSError, ValueError) as exc:
        print(f"bench.plot: error: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    output = args.output or args.json.with_suffix(".png")
    try:
        bars = plot(data, output, args.title, args.log)
    except ImportError:
        print("bench.plot: error: matplotlib is not installed (pip install '.[bench]')", file=sys.stderr)
        return 2
    if not bars:
        print(
            f"bench.plot: error: no benchmark in {args.json} reports jobs/s (extra_info['jobs_per_s'])", file=sys.stderr
        )
        return 2
    print(f"wrote {output} ({bars} bars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
