#!/usr/bin/python3
"""A soak of icd-server under load and faults (issue 20): the real binary, N
client threads for a while mixing Verify, Evaluate, ApplyPermutation,
ReadTensors, CapturePermutation and MeasureLatency over two models, beside
deliberate faults, then checks of what must hold afterwards.

  bench/soak.py --server-binary build/server/icd-server --model-root models \
      --models mamba1-pydoc/hf mamba2-pydoc/hf [--device cuda] [--dtype bfloat16] \
      [--clients 8] [--seconds 300] [--budget-mb 70000] [--grpc-bench build/bench/grpc_bench] \
      [--stall-seq-len 512] [--out soak.jsonl]

Faults, each with the status code it must get (anything else counts as
unexpected): float64 copies of a model loaded until the memory budget refuses
one (RESOURCE_EXHAUSTED; the copies unloaded after), a capture past the budget
(RESOURCE_EXHAUSTED), a latency run cancelled by its client (CANCELLED), a call
whose deadline passes (DEADLINE_EXCEEDED), an unload of a third model while
calls run on it (those calls end OK or NOT_FOUND). Under the budget the calls
the engine estimates (Evaluate, CapturePermutation, MeasureLatency, a load) may
be refused with RESOURCE_EXHAUSTED while the copies hold the device: allowed
and counted.

Checks at the end, each a line of --out and of the summary:
  unexpected    no call ended with a code outside its allowed set
  applies       each model's version is 1 + its applies that succeeded
  function      each model's logits on fixed tokens equal its logits before
                the soak (every apply is a symmetry: rel L2 within the verify
                tolerance), and Verify passes
  weights       the embedding equals the one before, its columns gathered by
                the composition of the residual permutations applied, in the
                order of the versions the server gave them
  memory        after the two models are unloaded at the end, the device
                memory icd's ledger counts (models and calls), and on a GPU
                the CUDA allocator's live bytes, are back to their values
                before anything was loaded (/metrics)
  health        SERVING throughout and at the end
With --grpc-bench, grpc_bench's health and ListModels p50 / p99 on the same
server after the soak, and health against a bare gRPC server beside it
(--bare-peer: gRPC's own floor on the machine). Exit status 0 when every check holds, 1 otherwise.
"""
import argparse
import collections
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

# The client: installed (pip, README), or from the tree with --stubs GEN (the
# build's client/python/gen, as the tests run it).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--stubs" in sys.argv:
    sys.path.insert(0, sys.argv[sys.argv.index("--stubs") + 1])
    sys.path.insert(0, os.path.join(REPO, "client", "python"))
import icd_client as icd  # noqa: E402
from icd_client.local_server import LocalServer  # noqa: E402

# The codes each operation may end with. Applies may be refused by their
# check (ABORTED, the model left as it was) or lose a version race
# (FAILED_PRECONDITION with expected_version); captures and latency runs on a
# busy device may be refused by the budget.
ALLOWED = {
    "verify": {"OK"}, "evaluate": {"OK", "RESOURCE_EXHAUSTED"}, "read": {"OK"},
    "apply": {"OK", "ABORTED", "FAILED_PRECONDITION"},
    "capture": {"OK", "RESOURCE_EXHAUSTED"}, "latency": {"OK", "RESOURCE_EXHAUSTED"},
    "load_past_budget": {"RESOURCE_EXHAUSTED"}, "capture_past_budget": {"RESOURCE_EXHAUSTED"},
    "cancelled": {"CANCELLED"}, "deadline": {"DEADLINE_EXCEEDED"},
    "during_unload": {"OK", "NOT_FOUND", "RESOURCE_EXHAUSTED"},
}
MAX_COPIES = 64


def scrape(address):
    """{(name, labels): value} of /metrics."""
    text = urllib.request.urlopen("http://%s/metrics" % address, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if match:
            out[(match.group(1), match.group(2) or "")] = float(match.group(3))
    return out


def device_bytes(metrics, device, name):
    return {labels: value for (metric, labels), value in metrics.items()
            if metric == name and 'device="%s"' % device in labels}


class Soak:
    def __init__(self, args, server):
        self.args = args
        self.server = server
        self.client = icd.Client(server.address, timeout=600)
        self.counts = collections.Counter()
        self.unexpected = []
        self.applied = collections.defaultdict(list)  # model -> [(version, residual index)]
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stall_rows = []
        rng = np.random.default_rng(20)
        self.ids = rng.integers(0, 200, size=(2, 64)).astype(np.int64)
        self.capture_ids = rng.integers(0, 200, size=(2, 128)).astype(np.int64)

    def record(self, op, code, model=""):
        with self.lock:
            self.counts[(op, code)] += 1
            if code not in ALLOWED[op]:
                self.unexpected.append({"op": op, "code": code, "model": model})

    def call(self, op, model, fn):
        try:
            result = fn()
            self.record(op, "OK", model)
            return result
        except icd.IcdError as err:
            self.record(op, err.code, model)
        except Exception as err:  # a client-side failure is unexpected too
            self.record(op, "EXCEPTION %s: %s" % (type(err).__name__, err), model)
        return None

    def worker(self, seed):
        rng = random.Random(seed)
        client = icd.Client(self.server.address, timeout=600)
        models = list(self.names)
        while not self.stop.is_set():
            model = rng.choice(models)
            op = rng.choice(["verify", "evaluate", "apply", "apply", "read", "capture", "latency"])
            if op == "verify":
                self.call(op, model, lambda: client.verify(model))
            elif op == "evaluate":
                self.call(op, model, lambda: client.evaluate(model, self.ids))
            elif op == "read":
                self.call(op, model, lambda: client.read_tensors(model, [self.embedding]))
            elif op == "capture":
                self.call(op, model, lambda: client.capture_permutation(
                    model, self.capture_ids, groups=[self.groups[model][1]]))
            elif op == "latency":
                self.call(op, model, lambda: client.measure_latency(
                    model, mode=rng.choice(["prefill", "decode"]), seq_len=64, iters=5))
            else:
                groups = self.groups[model]
                chosen = rng.sample(groups, k=min(len(groups), rng.randint(1, 3)))
                if "residual" not in chosen and rng.random() < 0.5:
                    chosen.append("residual")
                perms = icd.random_permutations(self.symmetries[model], rng.getrandbits(63),
                                                groups=chosen)
                report = self.call(op, model, lambda: client.apply(model, perms))
                if report is not None:
                    with self.lock:
                        self.applied[model].append(
                            (report.version, perms.get("residual")))
        client.close()

    def faults(self):
        """One round of each fault; returns when stopped."""
        client = icd.Client(self.server.address, timeout=600)
        while not self.stop.is_set():
            self.load_past_budget(client)
            huge = np.zeros((64, 8192), dtype=np.int64)
            self.call("capture_past_budget", self.names[0],
                      lambda: client.capture_permutation(self.names[0], huge))
            future = client._stub.MeasureLatency.future(icd.pb.LatencyRequest(
                model=self.names[0], seq_len=64, iters=2000), timeout=600)
            time.sleep(0.05)
            future.cancel()
            try:
                future.result()
                self.record("cancelled", "OK", self.names[0])
            except Exception as err:  # grpc.FutureCancelledError or an RpcError
                code = "CANCELLED" if type(err).__name__ == "FutureCancelledError" else str(
                    getattr(err, "code", lambda: "UNKNOWN")()).split(".")[-1]
                self.record("cancelled", code, self.names[0])
            short = icd.Client(self.server.address, timeout=0.001)
            self.call("deadline", self.names[1], lambda: short.measure_latency(
                self.names[1], seq_len=64, iters=500))
            short.close()
            self.unload_during_calls(client)
            self.stop.wait(1.0)
        client.close()

    def load_past_budget(self, client):
        """float64 copies of the first model until the budget refuses one."""
        copies = []
        for n in range(MAX_COPIES):
            name = "m-copy-%d" % n
            try:
                client.load(name, self.args.models[0], device=self.args.device, dtype="float64")
                copies.append(name)
            except icd.IcdError as err:
                self.record("load_past_budget", err.code, name)
                break
        else:
            self.record("load_past_budget", "OK", "%d copies" % MAX_COPIES)
        with self.lock:
            self.counts[("copies loaded", "OK")] += len(copies)
        for name in copies:
            client.unload(name)

    def unload_during_calls(self, client):
        name = "m-third"
        self.call("during_unload", name, lambda: client.load(
            name, self.args.models[0], device=self.args.device, dtype=self.args.dtype))
        threads = [threading.Thread(target=lambda: self.call(
            "during_unload", name, lambda: client.evaluate(name, self.ids))) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.01)
        self.call("during_unload", name, lambda: client.unload(name))
        for thread in threads:
            thread.join()

    def stall(self):
        """MeasureLatency of m0 alone, beside back-to-back applies on m1, and
        alone again (issue 20 item 2: on a GPU each model's calls run on a
        stream of its own). The applies count as the soak's."""
        def measure(label):
            report = self.client.measure_latency("m0", mode="prefill",
                                                 seq_len=self.args.stall_seq_len, iters=100)
            return {"label": label, "median_ms": report.median_ms, "p10_ms": report.p10_ms,
                    "p90_ms": report.p90_ms,
                    "ci95_ms": [report.ci95_low_ms, report.ci95_high_ms]}
        rows = [measure("m0 alone")]
        stop = threading.Event()
        applies = []

        def applier():
            client = icd.Client(self.server.address, timeout=600)
            rng = random.Random(7)
            while not stop.is_set():
                perms = icd.random_permutations(self.symmetries["m1"], rng.getrandbits(63))
                report = self.call("apply", "m1", lambda: client.apply("m1", perms))
                if report is not None:
                    applies.append(report.version)
                    with self.lock:
                        self.applied["m1"].append((report.version, perms.get("residual")))
            client.close()
        thread = threading.Thread(target=applier)
        thread.start()
        time.sleep(0.5)
        rows.append(measure("m0 beside applies on m1"))
        stop.set()
        thread.join()
        rows[-1]["applies_on_m1"] = len(applies)
        rows.append(measure("m0 alone again"))
        return rows

    def warm_streams(self):
        """First-use costs out of the way before the baseline: CUDA graph
        pools, LibTorch's stream pools. (cuBLAS's workspaces, one per server
        thread and stream, are given back when the last model is unloaded:
        the warm-up's last unload and the soak's both do.)"""
        for n in range(40):
            self.client.load("warm", self.args.models[0], device=self.args.device,
                             dtype=self.args.dtype)
            self.client.measure_latency("warm", mode="decode", seq_len=8, warmup=0, iters=1)
            self.client.unload("warm")

    def run(self):
        args = self.args
        if args.device.startswith("cuda"):
            self.warm_streams()
        metrics_start = scrape(self.server.metrics_address)
        self.names = ["m0", "m1"]
        for name, path in zip(self.names, args.models):
            self.client.load(name, path, device=args.device, dtype=args.dtype)
        self.symmetries = {m: self.client.symmetries(m) for m in self.names}
        self.groups = {m: [g.name for g in self.symmetries[m].groups] for m in self.names}
        self.embedding = next(member.tensor for g in self.symmetries["m0"].groups
                              if g.name == "residual" for member in g.members
                              if "embed" in member.tensor)
        before = {m: self.client.evaluate(m, self.ids, return_logits=True)["logits"]
                  for m in self.names}
        embedding_before = {m: self.client.read_tensors(m, [self.embedding])[self.embedding]
                            for m in self.names}
        device = self.client.models()[0].device
        if device == "cuda":
            device = "cuda:0"
        self.stall_rows = self.stall() if args.stall_seq_len else []

        threads = [threading.Thread(target=self.worker, args=(seed,))
                   for seed in range(args.clients)]
        threads.append(threading.Thread(target=self.faults))
        start = time.time()
        for thread in threads:
            thread.start()
        healthy = True
        while time.time() - start < args.seconds:
            healthy = healthy and self.client.health()
            time.sleep(1.0)
        self.stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.time() - start

        checks = []
        checks.append(("unexpected", not self.unexpected, {"calls": self.unexpected[:20]}))
        for m in self.names:
            info = next(i for i in self.client.models() if i.name == m)
            applies = len(self.applied[m])
            checks.append(("applies %s" % m, info.version == 1 + applies,
                           {"version": info.version, "applies": applies}))
            after = self.client.evaluate(m, self.ids, return_logits=True)["logits"]
            verify = self.client.verify(m)
            rel = float(np.linalg.norm(after - before[m]) / np.linalg.norm(before[m]))
            checks.append(("function %s" % m, verify.ok and rel <= verify.tolerance,
                           {"rel_l2": rel, "tolerance": verify.tolerance,
                            "verify_rel_l2": verify.rel_l2}))
            expected = embedding_before[m]
            for _, index in sorted(self.applied[m], key=lambda entry: entry[0]):
                if index is not None:
                    expected = expected[:, np.asarray(index)]
            now = self.client.read_tensors(m, [self.embedding])[self.embedding]
            checks.append(("weights %s" % m, bool(np.array_equal(now, expected)),
                           {"residual applies": sum(i is not None for _, i in self.applied[m])}))
        checks.append(("health", healthy and self.client.health(), {}))
        for m in self.names:
            self.client.unload(m)
        metrics_end = scrape(self.server.metrics_address)
        for name, kind in (("icd_device_memory_bytes", "models"),
                           ("icd_device_memory_bytes", "calls"),
                           ("icd_cuda_allocator_bytes", "allocated")):
            was = sum(v for k, v in device_bytes(metrics_start, device, name).items() if kind in k)
            now = sum(v for k, v in device_bytes(metrics_end, device, name).items() if kind in k)
            present = any(kind in k for k in device_bytes(metrics_end, device, name))
            if present or was:
                checks.append(("memory %s %s" % (name, kind), was == now,
                               {"before": was, "after unloads": now}))
        return elapsed, checks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server-binary", required=True)
    parser.add_argument("--model-root", required=True)
    parser.add_argument("--models", nargs=2, required=True)
    parser.add_argument("--device", default="")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--budget-mb", type=int, default=0,
                        help="the device's --memory-budget-mb (default: 4x the two models)")
    parser.add_argument("--stall-seq-len", type=int, default=0,
                        help="before the soak, time m0's prefill of this many tokens alone "
                             "and beside applies on m1 (0: not)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="one more icd-server flag (repeatable), e.g. --model-streams")
    parser.add_argument("--grpc-bench")
    parser.add_argument("--stubs", help="generated Python stubs (the build's client/python/gen)")
    parser.add_argument("--out", default="soak.jsonl")
    parser.add_argument("--label", default="")
    args = parser.parse_args()

    budget = args.budget_mb or 64
    extra = ["--metrics-listen", "127.0.0.1:0", "--memory-budget-mb", str(budget), "--quiet"]
    extra += args.server_arg
    exports = tempfile.mkdtemp(prefix="icd-soak-exports-")
    with LocalServer(args.server_binary, model_roots=[args.model_root], export_roots=[exports],
                     extra_args=extra) as server:
        soak = Soak(args, server)
        elapsed, checks = soak.run()
        bench = None
        if args.grpc_bench:
            out = subprocess.run([args.grpc_bench, "--server", server.address,
                                  "--calls", "2000", "--evaluate-calls", "0", "--bare-peer"],
                                 capture_output=True, text=True, check=False)
            bench = out.stdout.strip().splitlines()
        exit_code = server.stop()
    checks.append(("server exit", exit_code == 0, {"exit": exit_code}))
    ok = all(passed for _, passed, _ in checks)
    with open(args.out, "a") as out:
        header = {"bench": "soak", "label": args.label, "models": args.models,
                  "device": args.device or "default", "dtype": args.dtype or "as stored",
                  "clients": args.clients, "seconds": round(elapsed, 1), "budget_mb": budget,
                  "server_args": args.server_arg,
                  "calls": {"%s %s" % key: n for key, n in sorted(soak.counts.items())},
                  "grpc_bench": bench, "stall": soak.stall_rows, "pass": ok}
        out.write(json.dumps(header) + "\n")
        for name, passed, detail in checks:
            out.write(json.dumps({"check": name, "pass": passed, **detail}, default=str) + "\n")
    for name, passed, detail in checks:
        print("%-40s %s %s" % (name, "ok" if passed else "FAILED", json.dumps(detail, default=str)))
    print("calls:", dict(sorted(("%s %s" % k, n) for k, n in soak.counts.items())))
    for row in soak.stall_rows:
        print("stall:", json.dumps(row))
    if bench:
        print("\n".join(bench))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
