#!/usr/bin/python3
"""The hardware/software co-design loop, driven through icd by an
orchestrator, on one of icd's trained reference models (models/):

  1. dense        the model as trained
  2. coact        co-activation captured on validation text -> a permutation of
                  every group (modularity clustering) -> applied (verified)
  3. pruned       the Linear layers that read each layer's inner channels
                  (ReadTensors), 2:4 magnitude pruning in this client,
                  written back (WriteTensors)
  4. nm+pruned    first the sparsity-aware permutation of those channels
                  (objective nm_sparsity, applied and verified), then the same
                  2:4 pruning
  5. re-permuted  4, re-permuted by co-activation with aligned blocks of 4
                  kept whole or shuffled inside (preserve_block 4): the 2:4
                  pattern stays valid and the function stays the same

and a table: mean next-byte NLL on held-out validation text (Evaluate), bits
per byte, the change against dense, whether 2:4 holds, and for the
co-activation permutation the blocks touched per token. With --plots DIR,
three PNGs there (matplotlib, Debian's python3-matplotlib):
MODEL-coactivation.png (the first layer's channel group: its |correlation|
graph before and after the permutation, side by side), MODEL-blocks.png
(blocks touched per token, identity and co-activation order) and
MODEL-nll.png (each variant's NLL against dense). Exit status 0 when every
check held (permutations exact, pattern kept), whatever the figures.

  /usr/bin/python3 client/python/examples/codesign_loop.py [--build build]
      [--model mamba1-pydoc] [--address HOST:PORT] [--json OUT.json] [--plots DIR]
      [--device cuda --counters 3]

With --counters R each variant's prefill is timed against dense's in one
MeasureLatency call that also reads the GPU's hardware counters R times: DRAM
bytes and L2 hit rate beside the latency ratio (a server that cannot read them
says why, in the variant's row).

Without --address, icd-server is started on loopback with models/ as its
model root (the build's binary) and stopped with SIGTERM at the end.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
MODELS = os.path.join(REPO, "models")
N, M = 2, 4


def validation_rows(offset, rows, seq):
    """[rows, seq] byte ids from models/corpus/validation.txt at `offset`."""
    with open(os.path.join(MODELS, "corpus", "validation.txt"), "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8)
    need = rows * seq
    if offset + need > data.size:
        raise SystemExit("validation.txt has %d bytes; %d needed at offset %d"
                         % (data.size, need, offset))
    return data[offset:offset + need].astype(np.int64).reshape(rows, seq)


def channel_groups(symmetries):
    """The per-layer groups whose channels are the input of Linear layers
    that compression targets (Mamba-1 `inner`, Mamba-2 `headdim`), each with
    the weights that read it on axis 1."""
    out = []
    for group in symmetries.groups:
        if group.name.endswith((".inner", ".headdim")):
            readers = [m.tensor for m in group.members if m.axis == 1]
            out.append((group.name, readers))
    return out


def prune_nm(weight):
    """2:4 along the input axis by magnitude: in every aligned run of M input
    channels of a row, the N largest |w| stay."""
    rows, cols = weight.shape
    runs = weight.reshape(rows, cols // M, M)
    order = np.argsort(-np.abs(runs), axis=-1, kind="stable")
    keep = np.zeros_like(runs, dtype=bool)
    np.put_along_axis(keep, order[..., :N], True, axis=-1)
    return np.where(keep, runs, 0).reshape(rows, cols).astype(weight.dtype)


def nm_valid(weight):
    runs = weight.reshape(weight.shape[0], -1, M)
    return bool(((runs != 0).sum(-1) <= N).all())


def prune_model(client, name, readers):
    tensors = client.read_tensors(name, readers)
    pruned = {k: prune_nm(v) for k, v in tensors.items()}
    kept = sum(float(np.abs(pruned[k]).sum()) for k in pruned) / \
        sum(float(np.abs(tensors[k]).sum()) for k in tensors)
    client.write_tensors(name, pruned)
    return kept


def run(client, args):
    model_path = os.path.join(args.model, "hf")
    capture_ids = validation_rows(args.capture_offset, args.capture_rows, args.seq)
    eval_ids = validation_rows(args.eval_offset, args.eval_rows, args.seq)
    for v in ("dense", "coact", "pruned", "nm"):
        client.load(v, model_path, device=args.device)
    syms = client.symmetries("dense")
    groups = channel_groups(syms)
    group_names = [g for g, _ in groups]
    readers = [t for _, ts in groups for t in ts]
    rows, ok = [], True

    def nll(name):
        return client.evaluate(name, eval_ids)["mean_nll"]

    dense = nll("dense")
    rows.append({"variant": "dense", "nll": dense, "nm_valid": False,
                 "note": "the model as trained"})

    # 2. Co-activation: every group, applied and verified.
    t0 = time.perf_counter()
    coact = client.capture_permutation("coact", capture_ids, seeds=1,
                                       return_graph=bool(args.plots))
    report = client.apply("coact", coact)
    ok &= report.correctness.ok
    found = sum(r.structure_found for r in coact)
    per_type = {}
    for r in coact:
        kind = r.permutation.group.rsplit(".", 1)[-1]
        for b in r.blocks:
            per_type.setdefault((kind, b.block), []).append((b.identity, b.solved))
    blocks = {"%s@%d" % k: [float(np.mean([i for i, _ in v])), float(np.mean([s for _, s in v]))]
              for k, v in sorted(per_type.items())}
    value = nll("coact")
    rows.append({"variant": "coact", "nll": value, "nm_valid": False,
                 "note": "%d groups, structure found in %d; apply verified: %s (rel_l2 %.1e); %.1f s"
                         % (len(coact), found, report.correctness.ok, report.correctness.rel_l2,
                            time.perf_counter() - t0)})
    ok &= abs(value - dense) <= 1e-4 * abs(dense)

    # 3. 2:4 in the identity order.
    kept = prune_model(client, "pruned", readers)
    rows.append({"variant": "pruned", "nll": nll("pruned"),
                 "nm_valid": all(nm_valid(w) for w in client.read_tensors("pruned", readers).values()),
                 "note": "2:4 magnitude on %d weights; |w| kept %.3f" % (len(readers), kept)})

    # 4. The sparsity-aware permutation first, then the same pruning.
    nm = client.capture_permutation("nm", capture_ids, groups=group_names,
                                    objective="nm_sparsity", nm_n=N, nm_m=M)
    report = client.apply("nm", nm)
    ok &= report.correctness.ok
    efficacy = float(np.mean([r.nm_efficacy for r in nm]))
    kept_nm = prune_model(client, "nm", readers)
    nm_nll = nll("nm")
    rows.append({"variant": "nm+pruned", "nll": nm_nll,
                 "nm_valid": all(nm_valid(w) for w in client.read_tensors("nm", readers).values()),
                 "note": "nm_sparsity permutation (mean efficacy %.2f, verified %s), then 2:4; "
                         "|w| kept %.3f" % (efficacy, report.correctness.ok, kept_nm)})

    # 5. Re-permute the compressed model without breaking its 2:4 runs.
    reperm = client.capture_permutation("nm", capture_ids, groups=group_names,
                                        preserve_block=M, seeds=1)
    report = client.apply("nm", reperm)
    ok &= report.correctness.ok
    value = nll("nm")
    still = all(nm_valid(w) for w in client.read_tensors("nm", readers).values())
    ok &= still and abs(value - nm_nll) <= 1e-4 * abs(nm_nll)
    rows.append({"variant": "re-permuted", "nll": value, "nm_valid": still,
                 "note": "co-activation with preserve_block %d on %d groups; verified %s "
                         "(rel_l2 %.1e)" % (M, len(reperm), report.correctness.ok,
                                            report.correctness.rel_l2)})
    for r in rows:
        r["bits_per_byte"] = r["nll"] / np.log(2)
        r["vs_dense"] = r["nll"] / dense - 1
    # The first layer's first compression target, for the plot.
    plotted = next((r for r in coact if r.permutation.group == group_names[0]), None)
    counters = measure_counters(client, args) if args.counters else []
    return ok, rows, blocks, plotted, counters


def measure_counters(client, args):
    """Each variant's prefill of --seq tokens against dense's in the same
    call (MeasureLatency with counter_repeats): latency ratio, DRAM bytes and
    L2 hit rate from the GPU's counters. A server that cannot read them (a
    CPU model, no CUPTI) says why; the row carries its message."""
    out = []
    for variant in ("coact", "pruned", "nm"):
        try:
            r = client.measure_latency(variant, compare_model="dense", seq_len=args.seq,
                                       iters=20, counter_repeats=args.counters)
        except Exception as err:  # IcdError: the reason the counters were refused
            out.append({"variant": variant, "error": str(err)})
            continue
        row = {"variant": variant, "ratio": r.ratio,
               "ratio_ci95": [r.ratio_ci95_low, r.ratio_ci95_high], "counts": {}}
        for side, report in ((variant, r), ("dense", r.compare)):
            totals = report.counters.repeat_totals
            row["counts"][side] = {"dram_read_bytes": report.counters.total.dram_read_bytes,
                         "dram_write_bytes": report.counters.total.dram_write_bytes,
                         "l2_hit_rate": report.counters.total.l2_hit_rate,
                         "l2_sectors": report.counters.total.l2_sectors,
                         "dram_bytes_over_repeats": [
                             min(t.dram_read_bytes + t.dram_write_bytes for t in totals),
                             max(t.dram_read_bytes + t.dram_write_bytes for t in totals)]}
        out.append(row)
    return out


def print_counters(counters):
    print("prefill against dense in one call, GPU hardware counters (MeasureLatency):")
    print("%-12s %14s %12s %12s %9s %9s" % ("VARIANT", "LATENCY RATIO", "DRAM MB", "DENSE MB",
                                              "L2 HIT %", "DENSE %"))
    for row in counters:
        if "error" in row:
            print("%-12s %s" % (row["variant"], row["error"]))
            continue
        v, d = row["counts"][row["variant"]], row["counts"]["dense"]
        print("%-12s %14.3f %12.3f %12.3f %9.2f %9.2f" % (
            row["variant"], row["ratio"], (v["dram_read_bytes"] + v["dram_write_bytes"]) / 1e6,
            (d["dram_read_bytes"] + d["dram_write_bytes"]) / 1e6, 100 * v["l2_hit_rate"],
            100 * d["l2_hit_rate"]))


def plot(model, rows, blocks, result, out_dir, icd):
    """The three figures of --plots; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    before, after = icd.graph(result), icd.graph(result, solved=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), constrained_layout=True)
    top = float(np.quantile(before, 0.995)) or 1.0
    for ax, matrix, title in ((axes[0], before, "identity order"),
                              (axes[1], after, "co-activation order (π applied)")):
        image = ax.imshow(matrix, cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("channel")
        ax.set_ylabel("channel")
    fig.colorbar(image, ax=axes, shrink=0.8, label="|correlation|")
    blocks_16 = [b for b in result.blocks if b.block == 16]
    fig.suptitle("%s, group %s: |correlation| of its %d channels on validation text%s"
                 % (model, result.permutation.group, before.shape[0],
                    "\nblocks of 16 channels touched per held-out token: %.2f -> %.2f"
                    % (blocks_16[0].identity, blocks_16[0].solved) if blocks_16 else ""))
    paths.append(os.path.join(out_dir, "%s-coactivation.png" % model))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    keys = list(blocks)
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [blocks[k][0] for k in keys], 0.4, label="identity order")
    ax.bar(x + 0.2, [blocks[k][1] for k in keys], 0.4, label="co-activation order")
    ax.set_xticks(x, keys, rotation=30, ha="right")
    ax.set_ylabel("blocks touched per token (mean over layers)")
    ax.set_title("%s: blocks with an active channel, held-out tokens" % model)
    ax.legend()
    paths.append(os.path.join(out_dir, "%s-blocks.png" % model))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    names = [r["variant"] for r in rows]
    change = [100 * r["vs_dense"] for r in rows]
    bars = ax.bar(names, change, color=["#4c72b0" if not r["nm_valid"] else "#c44e52"
                                        for r in rows])
    ax.bar_label(bars, labels=["%+.2f%%" % (c if abs(c) >= 0.005 else 0.0) for c in change])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("NLL vs dense (%)")
    ax.set_title("%s: next-byte NLL on held-out text (red: 2:4 sparse)" % model)
    paths.append(os.path.join(out_dir, "%s-nll.png" % model))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def print_table(model, rows, blocks, args):
    print("co-design loop on %s: capture %d x %d bytes at %d, evaluation %d x %d bytes at %d "
          "of models/corpus/validation.txt" % (model, args.capture_rows, args.seq,
                                                args.capture_offset, args.eval_rows, args.seq,
                                                args.eval_offset))
    print("%-12s %10s %9s %9s %5s  %s" % ("VARIANT", "NLL", "BITS/B", "VS DENSE", "2:4", "NOTE"))
    for r in rows:
        print("%-12s %10.5f %9.4f %+8.2f%% %5s  %s" % (
            r["variant"], r["nll"], r["bits_per_byte"], 100 * r["vs_dense"],
            "yes" if r["nm_valid"] else "-", r["note"]))
    print("blocks touched per token (mean over layers), identity -> co-activation order:")
    for key, (identity, solved) in blocks.items():
        print("  %-14s %7.2f -> %7.2f" % (key, identity, solved))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(REPO, "build"), help="CMake build dir")
    p.add_argument("--model", default="mamba1-pydoc", help="a directory under models/")
    p.add_argument("--address", help="a running icd-server whose model root holds models/")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--capture-rows", type=int, default=16)
    p.add_argument("--capture-offset", type=int, default=65536)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--eval-offset", type=int, default=163840)
    p.add_argument("--device", default="", help="the models' device (default: the server's)")
    p.add_argument("--counters", type=int, default=0,
                   help="also time each variant against dense and read the GPU's hardware "
                        "counters this many times (CUDA)")
    p.add_argument("--json", help="write the table and its provenance here")
    p.add_argument("--plots", help="write the three PNG figures into this directory")
    args = p.parse_args()
    build = os.path.abspath(args.build)
    sys.path[:0] = [os.path.join(REPO, "client", "python"),
                    os.path.join(build, "client", "python", "gen")]
    import icd_client as icd
    from icd_client.local_server import LocalServer

    server = None
    if args.address:
        address = args.address
    else:
        # The loop exports nothing; the server requires an export root.
        exports = tempfile.mkdtemp(prefix="icd-codesign-")
        server = LocalServer(os.path.join(build, "server", "icd-server"), model_roots=[MODELS],
                             export_roots=[exports])
        address = server.address
    try:
        with icd.Client(address, timeout=600) as client:
            t0 = time.perf_counter()
            ok, rows, blocks, plotted, counters = run(client, args)
            seconds = time.perf_counter() - t0
    finally:
        code = server.stop() if server else 0
        if server:
            shutil.rmtree(exports, ignore_errors=True)
    print_table(args.model, rows, blocks, args)
    if counters:
        print_counters(counters)
    print("loop %.1f s; checks %s; server exit %d" % (seconds, "held" if ok else "FAILED", code))
    if args.plots:
        for path in plot(args.model, rows, blocks, plotted, args.plots, icd):
            print("wrote %s" % path)
    if args.json:
        with open(os.path.join(MODELS, args.model, "card.json")) as f:
            card = json.load(f)
        commit = os.popen("git -C %s rev-parse --short HEAD 2>/dev/null" % REPO).read().strip()
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows, "blocks_touched": blocks,
                       "counters": counters,
                       "checks_held": bool(ok), "seconds": seconds,
                       "settings": {k: v for k, v in vars(args).items() if k != "json"},
                       "model_card_validation_bits_per_byte": card["validation"]["bits_per_byte"],
                       "provenance": {"commit": commit or "unknown",
                                      "machine": " ".join(os.uname()[2:5]),
                                      "cpus": os.cpu_count(),
                                      "command": " ".join(["client/python/examples/codesign_loop.py"]
                                                          + sys.argv[1:]),
                                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}},
                      f, indent=1)
            f.write("\n")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
