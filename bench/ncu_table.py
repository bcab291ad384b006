#!/usr/bin/env python3
"""One Markdown row per kernel launch from Nsight Compute's
`--csv --page details --print-units base` output (bench/ncu_decode_h200.sh):
the sections' metrics that say how near a kernel runs to the memory's peak
and why not. A metric the sections did not report is shown as "-".

  bench/ncu_table.py NCU_DETAILS.csv [--title TITLE]
"""

import argparse
import csv
import io
import sys

# (column, ncu's display name of the metric, how to show it)
COLUMNS = [
    ("µs", "Duration", lambda v: "%.2f" % (float(v) / 1e3)),
    ("DRAM % of peak", "DRAM Throughput", lambda v: "%.1f" % float(v)),
    ("memory TB/s", "Memory Throughput", lambda v: "%.2f" % (float(v) / 1e12)),
    ("L2 hit %", "L2 Hit Rate", lambda v: "%.1f" % float(v)),
    ("grid", "Grid Size", lambda v: v),
    ("block", "Block Size", lambda v: v),
    ("regs", "Registers Per Thread", lambda v: v),
    ("waves", "Waves Per SM", lambda v: "%.2f" % float(v)),
    ("occupancy % (achieved / theory)", ("Achieved Occupancy", "Theoretical Occupancy"),
     lambda a, t: "%.1f / %.1f" % (float(a), float(t))),
    ("cycles per issue", "Warp Cycles Per Issued Instruction", lambda v: "%.1f" % float(v)),
]


def number(text):
    return text.replace(",", "")


def read(path):
    """{launch id: (kernel name, {metric display name: value})}, in launch order."""
    with open(path, newline="") as f:
        text = f.read()
    # ncu prints its own lines (==PROF==, warnings) before the table.
    start = text.find('"ID"')
    if start < 0:
        raise SystemExit("%s: no CSV table (no \"ID\" header)" % path)
    launches = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        name, value = row.get("Metric Name"), row.get("Metric Value")
        if not name or value is None:
            continue
        kernel, metrics = launches.setdefault(row["ID"], (row.get("Kernel Name", "?"), {}))
        metrics[name] = number(value)
        for column in ("Grid Size", "Block Size"):  # columns of every row, if no section has them
            metrics.setdefault(column, row.get(column, ""))
    return launches


def short(kernel):
    """'void icd::fused::(anonymous namespace)::Kernel<...>(...)' -> 'Kernel<...>'."""
    name = kernel.split("(anonymous namespace)::")[-1]
    depth = 0
    for i, c in enumerate(name):
        depth += c == "<"
        depth -= c == ">"
        if c == "(" and depth == 0:
            name = name[:i]
            break
    if name.startswith("void "):
        name = name[5:]
    return name if len(name) <= 70 else name[:67] + "..."


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv")
    p.add_argument("--title", default="")
    args = p.parse_args()
    launches = read(args.csv)
    if args.title:
        print("### %s\n" % args.title)
    print("| launch | kernel | " + " | ".join(c[0] for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for launch, (kernel, metrics) in launches.items():
        cells = []
        for _, names, show in COLUMNS:
            names = names if isinstance(names, tuple) else (names,)
            values = [metrics.get(n) for n in names]
            try:
                cells.append(show(*values) if all(v not in (None, "", "n/a") for v in values)
                             else "-")
            except ValueError:
                cells.append("-")
        print("| %s | `%s` | %s |" % (launch, short(kernel), " | ".join(cells)))
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
