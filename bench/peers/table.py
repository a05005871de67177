"""RESULTS.md's peers table from a ``pytest bench/test_peers.py --benchmark-json`` file:
one line per row and worker-process count, each figure also as a ratio to the fastbroker
reference rows of the same group and run.

    python -m bench.peers.table bench/results-out/peers.json [--references fastbroker,fastbroker-credit64]

Ratios: jobs/s of the row / the reference's (below 1: fewer jobs/s), CPU per job of the
row / the reference's (above 1: more CPU per job).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

GROUPS = ("peers-1proc", "peers-2proc")
REFERENCES = ("fastbroker", "fastbroker-credit64")


def rows(data: dict) -> OrderedDict[str, Dict[str, dict]]:
    """group -> row name -> extra_info, in the file's order."""
    table: OrderedDict[str, Dict[str, dict]] = OrderedDict((group, OrderedDict()) for group in GROUPS)
    for bench in data.get("benchmarks", []):
        group = bench.get("group")
        info = bench.get("extra_info") or {}
        if group not in table or "jobs_per_s" not in info:
            continue
        name = str(bench.get("param") or bench.get("name")).split("-", 1)[-1]  # "1proc-celery" -> "celery"
        table[group][name] = info
    return table


def _us(value: float) -> str:
    """Microseconds per job: whole ones, but a tenth below 10 (the broker row's are below 1)."""
    return f"{value:,.1f}" if value < 10 else f"{value:,.0f}"


def _ratio(value: float, reference: Optional[float]) -> str:
    if not reference:
        return ""
    ratio = value / reference
    return f"{ratio:.2f}×" if ratio >= 0.1 else f"{ratio:.3f}×"


def render(data: dict, references: Sequence[str]) -> List[str]:
    head = ["workers", "row", "jobs/s"]
    head += [f"jobs/s ÷ {ref}" for ref in references]
    head += ["CPU µs/job: client / server / workers", "CPU µs/job, all"]
    head += [f"CPU ÷ {ref}" for ref in references]
    head += ["1-job round trip p50, ms"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for group, named in rows(data).items():
        processes = group.split("-")[1].replace("proc", "")
        for name, info in named.items():
            cpu = info["cpu_us_per_job"]
            parts = " / ".join(_us(cpu.get(role, 0)) for role in ("client", "server", "workers"))
            bases = [named.get(ref, {}) for ref in references]
            cells = [processes, f"**{name}**" if name in references else name, f"{info['jobs_per_s']:,}"]
            cells += [_ratio(info["jobs_per_s"], base.get("jobs_per_s")) for base in bases]
            cells += [parts, _us(info["cpu_us_per_job_total"])]
            cells += [_ratio(info["cpu_us_per_job_total"], base.get("cpu_us_per_job_total")) for base in bases]
            cells += [f"{info['rtt_p50_us'] / 1000:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.table", description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="a file written by pytest bench/test_peers.py --benchmark-json")
    p.add_argument(
        "--references",
        default=",".join(REFERENCES),
        help=f"comma-separated rows the ratios divide by (default {','.join(REFERENCES)})",
    )
    args = p.parse_args(argv)
    try:
        data = json.loads(args.json.read_text())
    except (OSError, ValueError) as exc:
        print(f"bench.peers.table: error: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    if not any(rows(data).values()):
        print(f"bench.peers.table: error: no peers benchmark in {args.json}", file=sys.stderr)
        return 2
    print("\n".join(render(data, [r.strip() for r in args.references.split(",") if r.strip()])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
