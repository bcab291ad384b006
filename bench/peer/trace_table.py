#!/usr/bin/env python3
"""Where the time goes, from a Kineto chrome trace (LibTorch's profiler through
icd_profile, or torch.profiler for mamba_ssm): per region instance (a
user_annotation such as "icd_prefill" or "icd_decode_step", with a device sync
inside, so that every kernel it launched ran inside it), the wall time, the GPU
busy time (union of kernel, memcpy and memset intervals), kernel launches and
CUDA runtime calls; then tables per kernel name, per launching op, and of the
host's CPU ops (self time), averaged per region instance.

The critical path table is for kernels that overlap (a CUDA graph with
programmatic dependent launch: a kernel starts before the one ahead ends and
waits inside): kernels in order of their end, each is charged what it adds
to the region, its end less the end of the kernel before it (an idle gap
before it included), so that the charges sum to the kernels' span. Kernels of one
name are told apart by their grid (a decode step's projections).

  trace_table.py TRACE.json --region NAME [--label TEXT] [--json OUT.json] [--md OUT.md]
"""
import argparse
import collections
import json
import statistics

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def load(path):
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def union_length(intervals):
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def short(name, width=110):
    return name if len(name) <= width else name[:width - 3] + "..."


def self_times(ops):
    """Self time of CPU ops on each thread: duration less that of ops nested inside."""
    result = []
    by_thread = collections.defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [event, child_time]
        for e in events:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                done = stack.pop()
                result.append((done[0]["name"], done[0]["dur"] - done[1]))
            if stack:
                stack[-1][1] += e["dur"]
            stack.append([e, 0.0])
        while stack:
            done = stack.pop()
            result.append((done[0]["name"], done[0]["dur"] - done[1]))
    return result


def analyse(path, region, label=None):
    events = load(path)
    regions = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"] == region),
                     key=lambda e: e["ts"])
    if not regions:
        raise SystemExit(f"{path}: no user_annotation named {region!r}")
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    op_by_external = {}
    for e in ops:
        ext = e.get("args", {}).get("External id")
        if ext is not None:
            op_by_external[ext] = e["name"]

    n = len(regions)
    per_region = []
    kernels = collections.defaultdict(lambda: [0, 0.0])   # name -> [count, us]
    by_op = collections.defaultdict(lambda: [0, 0.0])
    calls = collections.defaultdict(lambda: [0, 0.0])
    host_self = collections.defaultdict(float)
    exposed = collections.defaultdict(lambda: [0, 0.0, 0.0])  # (name, grid) -> [count, us added, us run]
    for r in regions:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        inside = [e for e in gpu if lo <= e["ts"] and e["ts"] + e["dur"] <= hi + 1.0]
        busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in inside])
        launches = 0
        for e in inside:
            name = short(e["name"]) if e["cat"] == "kernel" else f"[{e['cat']}] {e['name']}"
            kernels[name][0] += 1
            kernels[name][1] += e["dur"]
            op = op_by_external.get(e.get("args", {}).get("External id"), "(launched outside an op)")
            by_op[op][0] += 1
            by_op[op][1] += e["dur"]
            launches += e["cat"] == "kernel"
        previous_end = None
        for e in sorted((e for e in inside if e["cat"] == "kernel"), key=lambda e: e["ts"] + e["dur"]):
            end = e["ts"] + e["dur"]
            grid = "x".join(str(g) for g in e.get("args", {}).get("grid", []))
            entry = exposed[(short(e["name"], 90), grid)]
            entry[0] += 1
            entry[1] += end - (e["ts"] if previous_end is None else previous_end)
            entry[2] += e["dur"]
            previous_end = end
        rt = [e for e in runtime if lo <= e["ts"] <= hi]
        for e in rt:
            calls[e["name"]][0] += 1
            calls[e["name"]][1] += e["dur"]
        region_ops = [e for e in ops if lo <= e["ts"] and e["ts"] + e["dur"] <= hi + 1.0]
        for name, t in self_times(region_ops):
            host_self[name] += t
        per_region.append({"wall_us": r["dur"], "gpu_busy_us": busy, "kernels": launches,
                           "gpu_ops": len(inside), "runtime_calls": len(rt)})

    def med(key):
        return statistics.median(p[key] for p in per_region)

    summary = {"trace": path, "label": label or region, "region": region, "instances": n,
               "wall_us_median": med("wall_us"), "gpu_busy_us_median": med("gpu_busy_us"),
               "kernels_per_instance": med("kernels"), "gpu_ops_per_instance": med("gpu_ops"),
               "runtime_calls_per_instance": med("runtime_calls")}
    summary["gpu_idle_fraction"] = 1 - summary["gpu_busy_us_median"] / summary["wall_us_median"]
    busy_total = sum(p["gpu_busy_us"] for p in per_region)

    def table(d, top):
        rows = sorted(d.items(), key=lambda kv: -kv[1][1])[:top]
        return [{"name": k, "per_instance": v[0] / n, "us_per_instance": v[1] / n,
                 "share_of_gpu_busy": v[1] / busy_total if busy_total else 0.0,
                 "mean_us": v[1] / v[0] if v[0] else 0.0} for k, v in rows]

    summary["kernels"] = table(kernels, 40)
    summary["by_op"] = table(by_op, 30)
    summary["critical_path"] = [
        {"name": k[0], "grid": k[1], "per_instance": v[0] / n, "us_added_per_instance": v[1] / n,
         "us_run_per_instance": v[2] / n}
        for k, v in sorted(exposed.items(), key=lambda kv: -kv[1][1])[:30]]
    summary["runtime"] = [{"name": k, "per_instance": v[0] / n, "us_per_instance": v[1] / n}
                          for k, v in sorted(calls.items(), key=lambda kv: -kv[1][1])[:15]]
    summary["host_self"] = [{"name": k, "us_per_instance": v / n}
                            for k, v in sorted(host_self.items(), key=lambda kv: -kv[1])[:20]]
    return summary


def markdown(s):
    lines = [f"### {s['label']}", "",
             f"{s['instances']} instances of `{s['region']}` (`{s['trace']}`); medians per instance: "
             f"wall {s['wall_us_median'] / 1000:.3f} ms, GPU busy {s['gpu_busy_us_median'] / 1000:.3f} ms "
             f"(GPU idle {100 * s['gpu_idle_fraction']:.0f}% of the wall time), "
             f"{s['kernels_per_instance']:.0f} kernels, {s['runtime_calls_per_instance']:.0f} CUDA runtime calls.",
             "", "| kernel | launches | µs per instance | share of GPU busy | mean µs |", "|---|---|---|---|---|"]
    for r in s["kernels"]:
        lines.append(f"| `{r['name']}` | {r['per_instance']:.0f} | {r['us_per_instance']:.1f} | "
                     f"{100 * r['share_of_gpu_busy']:.1f}% | {r['mean_us']:.1f} |")
    lines += ["", "Critical path: kernels in order of their end, each charged its end less the end of the one "
              "before it (what it adds when kernels overlap; an idle gap before it included).", "",
              "| kernel | grid | launches | µs added per instance | µs run per instance |", "|---|---|---|---|---|"]
    for r in s["critical_path"]:
        lines.append(f"| `{r['name']}` | {r['grid']} | {r['per_instance']:.0f} | "
                     f"{r['us_added_per_instance']:.1f} | {r['us_run_per_instance']:.1f} |")
    lines += ["", "| launching op | GPU ops | GPU µs per instance | share of GPU busy |", "|---|---|---|---|"]
    for r in s["by_op"]:
        lines.append(f"| `{r['name']}` | {r['per_instance']:.0f} | {r['us_per_instance']:.1f} | "
                     f"{100 * r['share_of_gpu_busy']:.1f}% |")
    lines += ["", "| CUDA runtime call | calls per instance | host µs per instance |", "|---|---|---|"]
    for r in s["runtime"]:
        lines.append(f"| `{r['name']}` | {r['per_instance']:.0f} | {r['us_per_instance']:.1f} |")
    lines += ["", "| host op (self time) | host µs per instance |", "|---|---|"]
    for r in s["host_self"]:
        lines.append(f"| `{short(r['name'], 80)}` | {r['us_per_instance']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--region", required=True)
    parser.add_argument("--label")
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args()
    s = analyse(args.trace, args.region, args.label)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    text = markdown(s)
    if args.md:
        with open(args.md, "a") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
