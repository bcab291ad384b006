#!/usr/bin/python3
"""icd-server's Prometheus endpoint (--metrics-listen, issue 22), black box:
the real binary on 127.0.0.1:0, driven by the Python client, scraped over
HTTP while a load of concurrent calls runs and after it; every count is
checked against the calls the test made:

- icd_requests_total per RPC and status code, the latency histogram
  (buckets cumulative, +Inf = _count = the calls, _sum > 0);
- icd_applies_total applied / refused (a refused apply leaves the model as it
  was, and is counted as refused), icd_verify_rel_l2 equal to the report's,
  gone with the model's unload;
- icd_trace_bytes_total = the float32 bytes a ComputePermutation stream sent;
- icd_models_loaded, icd_model_bytes (a model's device_bytes as ListModels
  reports them: parameters x dtype size + the probe reference, per device),
  icd_device_memory_bytes (what the memory budget counts per device: the
  models' bytes, no running call's after the calls) and
  icd_device_memory_budget_bytes (--memory-budget-mb cpu=4000),
  process_resident_memory_bytes; no icd_cuda_allocator_bytes on a CPU server;
- the exposition parses (HELP and TYPE before each family's samples), the
  content type is Prometheus' 0.0.4 text, other paths are 404 and other
  methods 405; a bad --metrics-listen stops the server at start with a message.

  /usr/bin/python3 metrics_test.py --server-binary B --stubs GEN --fixtures F
"""

import os
import re
import subprocess
import sys
import tempfile
import threading
import unittest
import urllib.error
import urllib.request

import numpy as np

from clients_test import parse_server_test_args

ARGS = None
icd = None  # icd_client, imported once the stubs are on sys.path

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


def scrape(address, path="/metrics", method="GET"):
    request = urllib.request.Request("http://%s%s" % (address, path), method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers.get("Content-Type"), response.read().decode()


def parse(text):
    """{(name, frozenset(labels)): value}; checks that every sample's family
    was introduced by # HELP and # TYPE."""
    declared, samples = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, "not an exposition line: %r" % line
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert family in declared or name in declared, "no # TYPE for %s" % name
        pairs = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


class MetricsTest(unittest.TestCase):
    def test_counts_match_the_calls_made(self):
        from icd_client.local_server import LocalServer
        models = os.path.join(ARGS.fixtures, "golden")
        with LocalServer(ARGS.server_binary, model_roots=[models],
                         export_roots=[tempfile.gettempdir()],
                         extra_args=["--metrics-listen", "127.0.0.1:0", "--quiet",
                                     "--memory-budget-mb", "cpu=4000"]) as server:
            self.assertIsNotNone(server.metrics_address)
            with icd.Client(server.address, timeout=60) as client:
                client.load("m", "mamba2-groups/hf")
                # Placed in two ranges (both on this CPU): one series for its
                # device, the ranges' bytes summed.
                client.load("other", "mamba1-small/hf", dtype="float64",
                            placement="cpu=0-0,cpu=1-1")
                ids = np.arange(32, dtype=np.int64).reshape(2, 16)

                # A load of concurrent calls, scraped while it runs.
                evaluations, workers, scrapes = 12, 4, []
                failures = []

                def work():
                    try:
                        for _ in range(evaluations // workers):
                            client.evaluate("m", ids)
                    except Exception as error:  # noqa: BLE001 (reported below)
                        failures.append(error)
                threads = [threading.Thread(target=work) for _ in range(workers)]
                for thread in threads:
                    thread.start()
                while any(thread.is_alive() for thread in threads):
                    scrapes.append(scrape(server.metrics_address)[0])
                for thread in threads:
                    thread.join()
                self.assertEqual(failures, [])
                self.assertTrue(scrapes and all(code == 200 for code in scrapes), scrapes)

                groups = client.symmetries("m")
                report = client.apply("m", client.random_permutations(groups, seed=3))
                self.assertTrue(report.verified)
                with self.assertRaises(icd.IcdError) as refused:
                    client.apply("m", {"layers.0.heads": [0, 0, 1, 2]})
                self.assertEqual(refused.exception.code, "INVALID_ARGUMENT")
                verify = client.verify("other")
                inner = [g for g in client.symmetries("other").groups if g.name == "layers.0.inner"]
                trace_rows = np.random.default_rng(6).standard_normal(
                    (300, inner[0].size)).astype(np.float32)
                client.compute_permutation("other", "layers.0.inner", trace_rows)

                status, content_type, text = scrape(server.metrics_address)
                self.assertEqual(status, 200)
                self.assertEqual(content_type, "text/plain; version=0.0.4; charset=utf-8")
                samples = parse(text)
                self.assertEqual(value(samples, "icd_requests_total", rpc="Evaluate", code="OK"),
                                 evaluations)
                self.assertEqual(value(samples, "icd_requests_total", rpc="LoadModel", code="OK"), 2)
                self.assertEqual(value(samples, "icd_requests_total", rpc="ApplyPermutation",
                                       code="OK"), 1)
                self.assertEqual(value(samples, "icd_requests_total", rpc="ApplyPermutation",
                                       code="INVALID_ARGUMENT"), 1)
                self.assertEqual(value(samples, "icd_requests_total", rpc="ComputePermutation",
                                       code="OK"), 1)
                buckets = sorted(
                    (float("inf") if dict(labels)["le"] == "+Inf" else float(dict(labels)["le"]), v)
                    for (name, labels), v in samples.items()
                    if name == "icd_request_duration_seconds_bucket" and ("rpc", "Evaluate") in labels)
                counts = [v for _, v in buckets]
                self.assertEqual(counts, sorted(counts))  # cumulative
                self.assertEqual(counts[-1], evaluations)
                self.assertEqual(value(samples, "icd_request_duration_seconds_count", rpc="Evaluate"),
                                 evaluations)
                self.assertGreater(value(samples, "icd_request_duration_seconds_sum",
                                         rpc="Evaluate"), 0)
                self.assertEqual(value(samples, "icd_applies_total", result="applied"), 1)
                self.assertEqual(value(samples, "icd_applies_total", result="refused"), 1)
                self.assertEqual(value(samples, "icd_verify_rel_l2", model="m"),
                                 float(repr(report.correctness.rel_l2)))
                self.assertAlmostEqual(value(samples, "icd_verify_rel_l2", model="other"),
                                       verify.rel_l2, delta=1e-12)
                self.assertEqual(value(samples, "icd_trace_bytes_total"), trace_rows.nbytes)
                self.assertEqual(value(samples, "icd_models_loaded"), 2)
                infos = {info.name: info for info in client.models()}
                for name, size in (("m", 4), ("other", 8)):
                    probe = 2 * 32 * (8 + 4 * infos[name].dims["vocab_size"])  # ids, logits
                    self.assertEqual(infos[name].device_bytes, infos[name].parameters * size + probe)
                self.assertEqual(value(samples, "icd_model_bytes", model="m", device="cpu",
                                       dtype="float32"), infos["m"].device_bytes)
                self.assertEqual(value(samples, "icd_model_bytes", model="other", device="cpu",
                                       dtype="float64"), infos["other"].device_bytes)
                self.assertEqual(value(samples, "icd_device_memory_bytes", device="cpu",
                                       held_by="models"),
                                 infos["m"].device_bytes + infos["other"].device_bytes)
                self.assertEqual(value(samples, "icd_device_memory_bytes", device="cpu",
                                       held_by="calls"), 0)
                self.assertEqual(value(samples, "icd_device_memory_budget_bytes", device="cpu"),
                                 4000 << 20)
                self.assertGreater(value(samples, "process_resident_memory_bytes"), 1 << 20)
                # A CPU server has no CUDA allocator to report (cuda_test checks the
                # figures on a GPU).
                self.assertFalse([s for s in samples if s[0] == "icd_cuda_allocator_bytes"])

                client.unload("other")
                samples = parse(scrape(server.metrics_address)[2])
                self.assertIsNone(value(samples, "icd_verify_rel_l2", model="other"))
                self.assertEqual(value(samples, "icd_models_loaded"), 1)
                self.assertEqual(value(samples, "icd_device_memory_bytes", device="cpu",
                                       held_by="models"), infos["m"].device_bytes)
                self.assertEqual(value(samples, "icd_requests_total", rpc="UnloadModel",
                                       code="OK"), 1)

            for path, method, code in (("/", "GET", 404), ("/metrics/x", "GET", 404),
                                       ("/metrics", "POST", 405)):
                with self.assertRaises(urllib.error.HTTPError) as error:
                    scrape(server.metrics_address, path, method)
                self.assertEqual(error.exception.code, code, (path, method))
            self.assertEqual(scrape(server.metrics_address, method="HEAD")[0], 200)
            self.assertEqual(server.stop(), 0)

    def test_bad_address_stops_the_server_at_start(self):
        for address, message in (("nowhere", "is not HOST:PORT"),
                                 ("no.such.host.invalid:9400", "cannot resolve"),
                                 ("127.0.0.1:70000", "is not HOST:PORT")):
            result = subprocess.run(
                [ARGS.server_binary, "--listen", "127.0.0.1:0", "--model-root", ARGS.fixtures,
                 "--export-root", tempfile.gettempdir(), "--metrics-listen", address],
                capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 1, address)
            self.assertIn(message, result.stderr, address)
            self.assertNotIn("listening on", result.stdout, address)


def main():
    global ARGS, icd
    ARGS, rest = parse_server_test_args(__doc__, ("--fixtures", "tests/fixtures"))
    sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                 "client", "python"), ARGS.stubs]
    import icd_client
    icd = icd_client
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
