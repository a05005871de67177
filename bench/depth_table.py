"""Per-operation table of a ``pytest bench/test_depth.py --benchmark-json=FILE`` run:
``python -m bench.depth_table FILE`` prints median round time / batch, per core and
depth, and the compiled core's 1,000,000 / 10 ratio per operation."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> int:
    data = json.load(open(path))
    per = defaultdict(dict)  # (core, op) -> depth -> (per-op µs median, min)
    prefill = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        s = b["stats"]
        per[(e["core"], e["op"])][e["depth"]] = (s["median"] / e["batch"] * 1e6, s["min"] / e["batch"] * 1e6)
        prefill[(e["core"], e["depth"], e["op"] == "expire")] = e["prefill_s"]
    depths = sorted({d for v in per.values() for d in v})
    print("| core | operation | " + " | ".join(f"depth {d:,} µs/op (min)" for d in depths) + " | 1M / 10 (median) |")
    print("|---|---|" + "---:|" * (len(depths) + 1))
    for (core, op), v in sorted(
        per.items(), key=lambda kv: (kv[0][0], ["enqueue", "dispatch", "answer", "cancel", "expire"].index(kv[0][1]))
    ):
        cells = [f"{v[d][0]:.2f} ({v[d][1]:.2f})" if d in v else "–" for d in depths]
        ratio = f"{v[depths[-1]][0] / v[depths[0]][0]:.2f}" if depths[0] in v and depths[-1] in v else "–"
        print(f"| {core} | {op} | " + " | ".join(cells) + f" | {ratio} |")
    print()
    print("pre-fill seconds (core, depth, expire rig):", dict(sorted(prefill.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
