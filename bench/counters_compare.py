#!/usr/bin/env python3
"""icd's hardware counters (counters_check --cupti, JSON lines) against Nsight
Compute's CSV of the same sample (ncu --csv --page raw --print-units base),
totals over every launch: DRAM bytes read and written, L2 sectors, the
sector-weighted L2 hit rate, launches; then the five kernels that read the
most DRAM in each.

  counters_compare.py CUPTI.jsonl NCU.csv [NCU.csv ...]
"""
import csv
import json
import sys

FIELDS = [("dram_read_bytes", "dram__bytes_read.sum"), ("dram_write_bytes", "dram__bytes_write.sum"),
          ("l2_sectors", "lts__t_sectors.sum")]


def parsed(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a run cut short leaves half a line
        return None


def cupti_totals(path):
    rows = [r for r in (parsed(line) for line in open(path) if line.startswith("{")) if r]
    totals = [r for r in rows if r["kernel"] == "total"]
    kernels = [r for r in rows if r["kernel"] != "total" and r["repeat"] == 0]
    return totals, kernels


def ncu_rows(path):
    lines = [line for line in open(path) if line.startswith('"')]
    reader = list(csv.DictReader(lines))
    # The row after the header holds the units.
    return [r for r in reader if r.get("ID", "").strip().isdigit()]


def base_name(kernel):
    """The function's own name: "void ns::<unnamed>::Kernel<T, 4>(Args)" and
    "ns::(anonymous namespace)::Kernel<T, 4>" are both "Kernel" (icd's and ncu's
    spellings differ in namespaces and arguments)."""
    depth, cut = 0, len(kernel)
    for i, c in enumerate(kernel):
        if c in "<(" and depth == 0 and not kernel.startswith(("<unnamed>", "(anonymous"), i):
            cut = i
            break
        depth += c == "<"
        depth -= c == ">" and depth > 0
    head = kernel[:cut].split(" ")[-1]
    return head.split("::")[-1]


def by_base_name(rows):
    sums = {}
    for name, launches, read, write in rows:
        s = sums.setdefault(base_name(name), [0, 0.0, 0.0])
        s[0] += launches
        s[1] += read
        s[2] += write
    return sums


def main(cupti_path, *ncu_paths):
    totals, kernels = cupti_totals(cupti_path)
    if not totals:
        print("%s: no counts" % cupti_path)
        return 1
    first = totals[0]
    print("## %s (%d launches)" % (first["label"], first["launches"]))
    spread = {name: (min(t[name] for t in totals), max(t[name] for t in totals)) for name, _ in FIELDS}
    print("icd (CUPTI), %d repeats: " % len(totals) + ", ".join(
        "%s %.6g (%.6g .. %.6g)" % (name, first[name], *spread[name]) for name, _ in FIELDS)
        + ", l2_hit_rate %.4f" % first["l2_hit_rate"])
    for path in ncu_paths:
        rows = ncu_rows(path)
        if not rows:
            print("%s: no ncu rows" % path)
            continue
        sums = {name: sum(float(r[metric].replace(",", "")) for r in rows) for name, metric in FIELDS}
        hits = sum(float(r["lts__t_sector_hit_rate.pct"].replace(",", "")) / 100 *
                   float(r["lts__t_sectors.sum"].replace(",", "")) for r in rows)
        hit_rate = hits / sums["l2_sectors"] if sums["l2_sectors"] else 0
        print("ncu %s: %d launches; " % (path.rsplit("/", 1)[-1], len(rows)) + ", ".join(
            "%s %.6g (icd/ncu %.4f)" % (name, sums[name], first[name] / sums[name] if sums[name] else 0)
            for name, _ in FIELDS) + ", l2_hit_rate %.4f" % hit_rate)
        # Kernel by kernel (by the function's own name), icd's first repeat.
        ours = by_base_name((k["kernel"], k["launches"], k["dram_read_bytes"], k["dram_write_bytes"])
                            for k in kernels)
        theirs = by_base_name((r["Kernel Name"], 1, float(r["dram__bytes_read.sum"].replace(",", "")),
                               float(r["dram__bytes_write.sum"].replace(",", ""))) for r in rows)
        for name in sorted(set(ours) | set(theirs), key=lambda n: -theirs.get(n, ours.get(n))[1]):
            o, t = ours.get(name, [0, 0.0, 0.0]), theirs.get(name, [0, 0.0, 0.0])
            print("  %-32.32s launches %4d / %4d  read %10.4g / %10.4g  write %10.4g / %10.4g  (icd / ncu)"
                  % (name, o[0], t[0], o[1], t[1], o[2], t[2]))
    top = sorted(kernels, key=lambda k: -k["dram_read_bytes"])[:5]
    for k in top:
        print("  icd top: %-70.70s x%d read %.4g write %.4g hit %.3f" % (
            k["kernel"], k["launches"], k["dram_read_bytes"], k["dram_write_bytes"], k["l2_hit_rate"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
