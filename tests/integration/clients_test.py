#!/usr/bin/python3
"""Black box of the clients: the icd-server binary on 127.0.0.1:0 driven by
icdctl (--json parsed), the Python client (icd_client) and `buf curl` through
server reflection (no .proto file); health; SIGTERM exits 0.

Run by ctest (tests/integration/CMakeLists.txt) with the system interpreter:
  /usr/bin/python3 clients_test.py --server-binary B --icdctl C --fixtures F \
      --stubs GEN --tools DIR
`buf` is taken from DIR/node_modules/.bin/buf, installed there with npm
(@bufbuild/buf) when missing.
"""

import argparse
import fcntl
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

import numpy as np

ARGS = None
BUF_PACKAGE = "@bufbuild/buf@1.75.0"


def parse_server_test_args(description, *flags):
    """The command line of a black-box test of icd-server (icd_python_test in
    CMakeLists.txt): the server and the stubs, then the test's own `flags`,
    (name, help) pairs; all required. Returns (args, the rest for unittest)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--server-binary", required=True)
    p.add_argument("--stubs", required=True, help="generated Python stubs dir")
    for name, help_text in flags:
        p.add_argument(name, required=True, help=help_text)
    return p.parse_known_args()


def parse_args():
    return parse_server_test_args(
        __doc__,
        ("--icdctl", None),
        ("--fixtures", "tests/fixtures"),
        ("--tools", "npm prefix holding buf"),
    )


def read_safetensors(path):
    """name -> numpy array, for the I64/F32 tensors of the golden files."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    kinds = {"I64": "<i8", "F32": "<f4", "F64": "<f8", "F16": "<f2"}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + begin:8 + n + end],
                                  dtype=kinds[meta["dtype"]]).reshape(meta["shape"])
    return out


def rel_l2(a, b):
    # icd_client is importable once main() / setUpClass has put the stubs on sys.path.
    from icd_client.local_server import rel_l2 as impl
    return impl(a, b)


def ensure_buf(tools):
    """buf from the project-local npm prefix; installed there when missing."""
    buf = os.path.join(tools, "node_modules", ".bin", "buf")
    os.makedirs(tools, exist_ok=True)
    with open(os.path.join(tools, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.access(buf, os.X_OK):
            npm = shutil.which("npm")
            if npm is None:
                raise AssertionError("npm is missing: `make deps` installs nodejs and npm")
            subprocess.run([npm, "install", "--prefix", tools, "--no-audit", "--no-fund",
                            BUF_PACKAGE], check=True, stdout=subprocess.DEVNULL)
    return buf


class ClientsTest(unittest.TestCase):
    """One server for the whole class. Each test loads the models it uses under
    names of its own and leaves the shared server serving, so the tests pass in
    any order and alone (issue 15: test_6 once read test_3's model, test_9
    stopped the server the others use). ICD_TEST_ORDER=reverse runs them
    backwards."""

    @classmethod
    def setUpClass(cls):
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sys.path[:0] = [os.path.join(repo, "client", "python"), ARGS.stubs]
        import icd_client  # noqa: E402 (needs the stubs path)
        cls.icd = icd_client
        cls.tmp = tempfile.mkdtemp(prefix="icd-clients-test-")
        cls.models = os.path.join(cls.tmp, "models")
        cls.exports = os.path.join(cls.tmp, "exports")
        os.makedirs(cls.exports)
        golden = os.path.join(ARGS.fixtures, "golden")
        for name in ("mamba1-small", "mamba2-groups"):
            shutil.copytree(os.path.join(golden, name, "hf"),
                            os.path.join(cls.models, name, "hf"))
        cls.golden = {name: read_safetensors(os.path.join(golden, name, "golden.safetensors"))
                      for name in ("mamba1-small", "mamba2-groups")}
        from icd_client.local_server import LocalServer
        cls.server = LocalServer(ARGS.server_binary, model_roots=[cls.models],
                                 export_roots=[cls.exports])
        cls.proc = cls.server.proc
        cls.port = cls.server.port
        cls.address = cls.server.address
        cls.client = icd_client.Client(cls.address, timeout=120)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.kill()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def server_log(cls):
        return cls.server.log()

    def ctl(self, *args, expect=0):
        """Runs icdctl --json; returns the parsed JSON (or stdout)."""
        cmd = [ARGS.icdctl, "--server", self.address, "--timeout", "120"] + list(args)
        r = subprocess.run(cmd, capture_output=True, text=True)
        self.assertEqual(r.returncode, expect, "%s\nstdout: %s\nstderr: %s"
                         % (" ".join(cmd), r.stdout, r.stderr))
        if expect != 0:
            return r.stderr
        return json.loads(r.stdout) if "--json" in args else r.stdout

    # ------------------------------------------------------------ health

    def test_0_health_serving(self):
        self.assertTrue(self.client.health())
        self.assertTrue(self.client.health("icd.v1.PermutationService"))

    # ------------------------------------------------------------ icdctl

    def test_1_icdctl_main_job(self):
        gold = self.golden["mamba2-groups"]
        info = self.ctl("--json", "load", "cli", "mamba2-groups/hf", "--dtype", "float32")
        self.assertEqual((info["name"], info["family"], info["layout"], info["version"]),
                         ("cli", "mamba2", "hf", "1"))

        syms = self.ctl("--json", "symmetries", "cli")
        names = [g["name"] for g in syms["groups"]]
        self.assertEqual(names[0], "residual")
        for i in range(2):
            for kind in ("heads", "headdim", "state"):
                self.assertIn("layers.%d.%s" % (i, kind), names)
        heads = next(g for g in syms["groups"] if g["name"] == "layers.0.heads")
        self.assertEqual((heads["size"], heads["whole"]), ("8", "4"))
        table = self.ctl("symmetries", "cli")
        self.assertIn("GROUP", table)
        self.assertIn("layers.1.headdim", table)

        report = self.ctl("--json", "apply", "cli", "--random", "11", "--expected-version", "1")
        self.assertEqual(report["version"], "2")
        self.assertEqual(report["groups"], names)
        self.assertTrue(report["verified"])
        self.assertTrue(report["correctness"]["ok"], report)
        self.assertLess(report["correctness"]["rel_l2"], 1e-5)
        self.assertEqual(report["correctness"]["top1_agreement"], 1.0)

        human = self.ctl("apply", "cli", "--random", "12", "--groups", "layers.1.state,residual")
        self.assertIn("applied 2 permutations to cli: version 3", human)
        self.assertIn("OK: rel_l2", human)

        verify = self.ctl("--json", "verify", "cli")
        self.assertTrue(verify["ok"])
        self.assertLess(verify["rel_l2"], 1e-5)

        ids = ",".join(str(int(v)) for v in gold["input_ids"].ravel())
        ev = self.ctl("--json", "evaluate", "cli", "--ids", ids, "--batch", "2", "--logits")
        self.assertEqual([int(v) for v in ev["shape"]], list(gold["logits"].shape))
        self.assertEqual(int(ev["tokens"]), 2 * 16)
        self.assertTrue(math.isfinite(ev["mean_nll"]))
        logits = np.asarray(ev["logits"], dtype=np.float32).reshape(gold["logits"].shape)
        self.assertLess(rel_l2(logits, gold["logits"]), 1e-4)  # design.md: HF goldens

        exported = self.ctl("--json", "export", "cli", "cli-export")
        self.assertEqual(exported["version"], "3")
        self.assertIn("config.json", exported["files"])
        self.assertIn("model.safetensors", exported["files"])
        for f in exported["files"]:
            self.assertTrue(os.path.isfile(os.path.join(self.exports, "cli-export", f)), f)

        models = self.ctl("--json", "models")["models"]
        cli = next(m for m in models if m["name"] == "cli")
        self.assertEqual(cli["version"], "3")

    def test_2_icdctl_perm_file_and_errors(self):
        self.ctl("--json", "load", "perm", "mamba1-small/hf")
        syms = self.client.symmetries("perm")
        size = next(g.size for g in syms.groups if g.name == "residual")
        reverse = list(range(size))[::-1]
        path = os.path.join(self.tmp, "perm.json")
        with open(path, "w") as f:
            json.dump({"residual": reverse, "layers.0.state": [1, 0, 2, 3, 4, 5, 6, 7]}, f)
        report = self.ctl("--json", "apply", "perm", "--perm", path)
        self.assertEqual(report["groups"], ["residual", "layers.0.state"])
        self.assertTrue(report["correctness"]["ok"])

        stale = self.ctl("apply", "perm", "--perm", path, "--expected-version", "1", expect=9)
        self.assertTrue(stale.startswith("icdctl: FAILED_PRECONDITION: "), stale)
        with open(path, "w") as f:
            json.dump({"residual": [0] * size}, f)
        bad = self.ctl("apply", "perm", "--perm", path, expect=3)
        self.assertIn("icdctl: INVALID_ARGUMENT: ", bad)
        self.assertIn("residual", bad)
        self.assertIn("NOT_FOUND", self.ctl("verify", "nope", expect=5))
        self.assertIn("unknown command", self.ctl("frobnicate", expect=3))
        self.ctl("unload", "perm")
        self.assertNotIn("perm", [m.name for m in self.client.models()])

        r = subprocess.run([ARGS.icdctl, "--help"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0)
        for command in ("load", "models", "unload", "symmetries", "apply", "verify",
                        "evaluate", "export"):
            self.assertIn("icdctl --server 127.0.0.1:50051 %s" % command, r.stdout)

    # ------------------------------------------------------------ Python client

    def test_3_python_main_job(self):
        icd, c = self.icd, self.client
        gold = self.golden["mamba1-small"]
        info = c.load("py", "mamba1-small/hf", dtype="float32")
        self.assertEqual((info.family, info.layout, info.version), ("mamba1", "hf", 1))
        before = c.evaluate("py", gold["input_ids"], return_logits=True)
        self.assertEqual(before["logits"].shape, gold["logits"].shape)
        self.assertLess(rel_l2(before["logits"], gold["logits"]), 1e-4)

        syms = c.symmetries("py")
        perms = c.random_permutations(syms, seed=2024)
        self.assertEqual(list(perms), [g.name for g in syms.groups])
        report = c.apply("py", perms, expected_version=1)
        self.assertEqual(report.version, 2)
        self.assertTrue(report.correctness.ok)
        self.assertLess(report.correctness.rel_l2, 1e-5)
        self.assertGreater(report.apply_ms, 0)

        after = c.evaluate("py", gold["input_ids"], return_logits=True)
        self.assertLess(rel_l2(after["logits"], before["logits"]), 1e-5)
        self.assertLess(rel_l2(after["logits"], gold["logits"]), 1e-4)
        self.assertTrue(np.array_equal(after["logits"].argmax(-1), gold["logits"].argmax(-1)))
        self.assertAlmostEqual(after["mean_nll"], before["mean_nll"], places=4)
        self.assertTrue(c.verify("py").ok)

        # The permutation moved weights: the residual gather shows in the embedding.
        emb = "backbone.embeddings.weight"
        tensors = c.read_tensors("py")
        self.assertIn(emb, tensors)
        self.assertEqual(tensors[emb].dtype, np.float32)
        named = c.read_tensors("py", [emb])
        self.assertEqual(list(named), [emb])
        self.assertTrue(np.array_equal(named[emb], tensors[emb]))

        # Round trip: write back what was read, then read again: identical.
        version = c.write_tensors("py", tensors, expected_version=2)
        self.assertEqual(version, 3)
        again = c.read_tensors("py")
        self.assertEqual(sorted(again), sorted(tensors))
        for name in tensors:
            self.assertTrue(np.array_equal(again[name], tensors[name]), name)
        with self.assertRaises(icd.IcdError) as stale:
            c.write_tensors("py", {emb: tensors[emb]}, expected_version=2)
        self.assertEqual(stale.exception.code, "FAILED_PRECONDITION")

        exported = c.export("py", "py-export")
        self.assertEqual(exported.version, 3)
        self.assertIn("model.safetensors", list(exported.files))
        os.makedirs(os.path.join(self.models, "reloaded"))
        shutil.copytree(exported.path, os.path.join(self.models, "reloaded", "hf"))
        c.load("py-reloaded", "reloaded/hf")
        reloaded = c.evaluate("py-reloaded", gold["input_ids"], return_logits=True)
        self.assertLess(rel_l2(reloaded["logits"], after["logits"]), 1e-6)

        with self.assertRaises(icd.IcdError) as missing:
            c.load("ghost", "no-such-checkpoint/hf")
        self.assertEqual(missing.exception.code, "NOT_FOUND")
        with self.assertRaises(icd.IcdError) as outside:
            c.export("py", "/etc/icd-should-not-exist")
        self.assertEqual(outside.exception.code, "PERMISSION_DENIED")

    def test_4_python_bfloat16_tensors(self):
        c = self.client
        c.load("bf", "mamba1-small/hf", dtype="bfloat16")
        tensors = c.read_tensors("bf")
        name = "backbone.embeddings.weight"
        self.assertEqual(tensors[name].dtype, np.float32)  # widened, exactly
        bits = tensors[name].view(np.uint32)
        self.assertTrue(np.all(bits & 0xFFFF == 0))
        version = c.write_tensors("bf", {name: tensors[name]}, expected_version=1)
        self.assertEqual(version, 2)
        self.assertTrue(np.array_equal(c.read_tensors("bf", [name])[name], tensors[name]))
        c.unload("bf")

    def test_5_cpp_and_python_draw_the_same_permutations(self):
        c = self.client
        c.load("pa", "mamba2-groups/hf")
        c.load("pb", "mamba2-groups/hf")
        self.ctl("--json", "apply", "pa", "--random", "5")
        c.apply("pb", c.random_permutations(c.symmetries("pb"), 5))
        a, b = c.read_tensors("pa"), c.read_tensors("pb")
        for name in a:
            self.assertTrue(np.array_equal(a[name], b[name]), name)
        c.unload("pa")
        c.unload("pb")

    # ------------------------------------------------------------ buf curl

    def buf_curl(self, *args):
        buf = ensure_buf(ARGS.tools)
        return subprocess.run([buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
                              + list(args), capture_output=True, text=True, timeout=120)

    def test_6_buf_curl_calls_through_reflection(self):
        self.client.load("bufm", "mamba1-small/hf")
        self.addCleanup(self.client.unload, "bufm")
        base = "http://%s" % self.address
        r = self.buf_curl("--list-services", base)
        self.assertEqual(r.returncode, 0, r.stderr)
        for service in ("icd.v1.PermutationService", "grpc.health.v1.Health"):
            self.assertIn(service, r.stdout.split())

        r = self.buf_curl("-d", json.dumps({"model": "bufm"}),
                          base + "/icd.v1.PermutationService/GetSymmetries")
        self.assertEqual(r.returncode, 0, r.stderr)
        syms = json.loads(r.stdout)
        self.assertEqual(syms["model"], "bufm")
        self.assertEqual(syms["groups"][0]["name"], "residual")

        r = self.buf_curl("-d", "{}", base + "/icd.v1.PermutationService/ListModels")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("bufm", [m["name"] for m in json.loads(r.stdout)["models"]])

        r = self.buf_curl("-d", json.dumps({"model": "ghost"}),
                          base + "/icd.v1.PermutationService/Verify")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("not_found", r.stderr)

    def test_7_buf_curl_lists_every_method_and_health(self):
        # Reflection must describe every service it lists, grpc.health.v1
        # included: `--list-methods` resolves them all (design.md: buf curl
        # lists and calls everything without .proto files).
        base = "http://%s" % self.address
        r = self.buf_curl("--list-methods", base)
        self.assertEqual(r.returncode, 0, r.stderr)
        methods = r.stdout.split()
        for m in ("LoadModel", "ListModels", "UnloadModel", "GetSymmetries",
                  "ApplyPermutation", "Verify", "Evaluate", "ReadTensors", "WriteTensors",
                  "ExportModel", "GetProgress"):
            self.assertIn("icd.v1.PermutationService/" + m, methods)
        self.assertIn("grpc.health.v1.Health/Check", methods)
        r = self.buf_curl(base + "/grpc.health.v1.Health/Check")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), {"status": "SERVING"})

    # ------------------------------------------------------------ traces

    @staticmethod
    def structured_rows(rows, channels=128, seed=0):
        """float32 [rows, channels]: groups of 8 channels, scattered, share a
        latent signal (something for the solver to find), plus noise."""
        rng = np.random.default_rng(seed)
        owner = rng.permutation(np.arange(channels) % (channels // 8))
        latent = rng.standard_normal((rows, channels // 8))
        noise = rng.standard_normal((rows, channels))
        return (latent[:, owner] + 0.3 * noise).astype(np.float32)

    def assert_permutation(self, index, n):
        self.assertEqual(sorted(int(i) for i in index), list(range(n)))

    def test_8a_icdctl_compute_and_capture(self):
        self.ctl("--json", "load", "tr", "mamba1-small/hf")
        rows = self.structured_rows(3000, seed=1)
        npy = os.path.join(self.tmp, "acts.npy")
        np.save(npy, rows)
        out = self.ctl("--json", "compute", "--model", "tr", "--group", "layers.0.inner",
                       "--traces", npy, "--holdout-rows", "500", "--seed", "1",
                       "--blocks", "16,32", "--apply")
        result, applied = out["result"], out["apply"]
        self.assertEqual(result["permutation"]["group"], "layers.0.inner")
        self.assert_permutation(result["permutation"]["index"], 128)
        self.assertEqual(int(result["tokens"]), 2500)
        self.assertEqual(int(result["holdout_tokens"]), 500)
        self.assertEqual([b["block"] for b in result["blocks"]], [16, 32])
        self.assertTrue(result["structure_found"], result)
        self.assertEqual(applied["version"], "2")
        self.assertTrue(applied["correctness"]["ok"], applied)

        # float64 .npy and raw float32 with --channels: the same rows, the same answer.
        npy64 = os.path.join(self.tmp, "acts64.npy")
        np.save(npy64, rows.astype(np.float64))
        raw = os.path.join(self.tmp, "acts.f32")
        rows.astype("<f4").tofile(raw)
        same = [self.ctl("--json", "compute", "--model", "tr", "--group", "layers.0.inner",
                         "--traces", path, "--holdout-rows", "500", "--seed", "1",
                         "--blocks", "16,32", *extra)
                for path, extra in ((npy64, ()), (raw, ("--channels", "128")))]
        for other in same:
            self.assertEqual(other["permutation"]["index"], result["permutation"]["index"])
        table = self.ctl("compute", "--model", "tr", "--group", "layers.0.inner",
                         "--traces", npy)
        for word in ("GROUP", "NULL Q", "STRUCTURE", "BLOCKS@16", "BLOCKS@64",
                     "layers.0.inner", "3000 rows x 128 float32 channels"):
            self.assertIn(word, table)

        capture = self.ctl("--json", "capture", "--model", "tr", "--random-tokens", "64",
                           "--batch", "4", "--random-holdout", "16", "--seeds", "3", "--apply")
        names = [g.name for g in self.client.symmetries("tr").groups]
        self.assertEqual([r["permutation"]["group"] for r in capture["results"]], names)
        for r in capture["results"]:
            self.assertGreater(int(r["tokens"]), 0)
        self.assertTrue(capture["apply"]["correctness"]["ok"], capture["apply"])
        self.assertEqual(capture["apply"]["version"], "3")
        ids = os.path.join(self.tmp, "ids.txt")
        with open(ids, "w") as f:
            f.write(",".join(str(i) for i in self.golden["mamba1-small"]["input_ids"].ravel()))
        human = self.ctl("capture", "--model", "tr", "--tokens", ids, "--batch", "2",
                         "--groups", "layers.1.state,residual")
        self.assertIn("captured 34 tokens (2 x 17), 2 groups solved", human)
        self.assertLess(human.index("layers.1.state"), human.index("residual"))
        self.assertTrue(self.client.verify("tr").ok)
        self.ctl("unload", "tr")

    def test_8b_icdctl_refuses_bad_trace_files(self):
        bad = {
            "fortran.npy": (np.asfortranarray(np.ones((4, 128), np.float32)), "Fortran"),
            "ints.npy": (np.ones((4, 128), np.int64), "'<i8' is not supported"),
            "cube.npy": (np.ones((2, 4, 16), np.float32), "2-D"),
            "big.npy": (np.ones((4, 128), ">f4"), "'>f4' is not supported"),
        }
        for name, (array, message) in bad.items():
            path = os.path.join(self.tmp, name)
            np.save(path, array)
            err = self.ctl("compute", "--model", "m", "--group", "residual", "--traces", path,
                           expect=3)
            self.assertIn(message, err, name)
        raw = os.path.join(self.tmp, "odd.f32")
        np.ones(130, "<f4").tofile(raw)
        self.assertIn("--channels", self.ctl("compute", "--model", "m", "--group", "residual",
                                             "--traces", raw, expect=3))
        self.assertIn("not whole rows", self.ctl("compute", "--model", "m", "--group", "residual",
                                                 "--traces", raw, "--channels", "64", expect=3))
        self.assertIn("--nm", self.ctl("compute", "--model", "m", "--group", "residual",
                                       "--traces", raw, "--nm", "2-4", expect=3))
        r = subprocess.run([ARGS.icdctl, "--help"], capture_output=True, text=True)
        for command in ("capture", "compute"):
            self.assertIn("icdctl --server 127.0.0.1:50051 %s" % command, r.stdout)

    def test_8c_python_compute_and_capture(self):
        icd, c = self.icd, self.client
        c.load("pyt", "mamba1-small/hf")
        rows = self.structured_rows(3000, seed=2)
        result = c.compute_permutation("pyt", "layers.0.inner", rows, holdout_rows=500,
                                       seed=4, block_sizes=[16, 64])
        self.assert_permutation(result.permutation.index, 128)
        self.assertEqual((result.tokens, result.holdout_tokens), (2500, 500))
        self.assertTrue(result.structure_found)
        self.assertGreater(result.modularity, result.modularity_null)
        table = icd.summarize(result)
        self.assertIn("layers.0.inner", table)
        self.assertIn("BLOCKS@64", table)

        # A generator of blocks, consumed lazily: the same rows, the same answer.
        taken = []

        def blocks():
            for start in range(0, len(rows), 700):
                taken.append(start)
                yield rows[start:start + 700].astype(np.float64)

        lazy = c.compute_permutation("pyt", "layers.0.inner", blocks(), holdout_rows=500,
                                     chunk_rows=100, seed=4, block_sizes=[16, 64])
        self.assertEqual(len(taken), 5)
        self.assertEqual(list(lazy.permutation.index), list(result.permutation.index))

        report = c.apply("pyt", {result.permutation.group: result.permutation.index},
                         expected_version=1)
        self.assertTrue(report.correctness.ok)

        def mismatched():
            yield rows[:100]
            yield rows[:100, :64]

        with self.assertRaises(icd.IcdError) as bad:
            c.compute_permutation("pyt", "layers.0.inner", mismatched())
        self.assertEqual(bad.exception.code, "INVALID_ARGUMENT")
        self.assertIn("64 channels", bad.exception.message)
        with self.assertRaises(icd.IcdError) as flat:
            c.compute_permutation("pyt", "layers.0.inner", rows[0])
        self.assertIn("2-D", flat.exception.message)
        with self.assertRaises(TypeError):
            c.compute_permutation("pyt", "layers.0.inner", rows, colour="blue")
        with self.assertRaises(icd.IcdError) as wrong:
            c.compute_permutation("pyt", "layers.0.inner", rows[:, :100])
        self.assertEqual(wrong.exception.code, "INVALID_ARGUMENT")
        self.assertIn("layers.0.inner", wrong.exception.message)
        with self.assertRaises(icd.IcdError) as nan:
            poisoned = rows.copy()
            poisoned[2000, 5] = np.nan
            c.compute_permutation("pyt", "layers.0.inner", poisoned)
        self.assertEqual(nan.exception.code, "INVALID_ARGUMENT")

        ids = np.random.default_rng(3).integers(0, 128, (4, 64))
        results = c.capture_permutation("pyt", ids, holdout_ids=ids[:, :16], seeds=2)
        names = [g.name for g in c.symmetries("pyt").groups]
        self.assertEqual([r.permutation.group for r in results], names)
        table = icd.summarize(results)
        for name in names:
            self.assertIn(name, table)
        report = c.apply("pyt", {r.permutation.group: r.permutation.index for r in results},
                         expected_version=2)
        self.assertEqual(report.version, 3)
        self.assertTrue(report.correctness.ok)
        self.assertTrue(c.verify("pyt").ok)
        some = c.capture_permutation("pyt", ids, groups=["residual"], objective="nm_sparsity",
                                     nm_n=2, nm_m=4)
        self.assertEqual([r.permutation.group for r in some], ["residual"])
        c.unload("pyt")

    def test_8d_max_trace_mb_flag(self):
        from icd_client.local_server import LocalServer
        with LocalServer(ARGS.server_binary, model_roots=[self.models],
                         export_roots=[self.exports], extra_args=["--max-trace-mb", "1"]) as srv:
            with self.icd.Client(srv.address, timeout=120) as c:
                c.load("lim", "mamba1-small/hf")
                two_mib = self.structured_rows((2 << 20) // (4 * 128), seed=5)
                with self.assertRaises(self.icd.IcdError) as over:
                    c.compute_permutation("lim", "layers.0.inner", two_mib)
                self.assertEqual(over.exception.code, "RESOURCE_EXHAUSTED")
                self.assertIn("1 MiB", over.exception.message)
                self.assertIn("--max-trace-mb", over.exception.message)
                ok = c.compute_permutation("lim", "layers.0.inner", two_mib[:1000])
                self.assert_permutation(ok.permutation.index, 128)

    # ------------------------------------------------------------ latency

    def test_8e_measure_latency_python_and_icdctl(self):
        c = self.client
        c.load("lat", "mamba1-small/hf")
        report = c.measure_latency("lat", compare_model="lat", mode="decode", batch=2,
                                   seq_len=8, warmup=1, iters=6)
        for timing in (report, report.compare):
            self.assertEqual(timing.samples, 6)
            self.assertEqual((timing.device, timing.method), ("cpu", "steady_clock"))
            self.assertLessEqual(timing.p10_ms, timing.median_ms)
            self.assertLessEqual(timing.median_ms, timing.p90_ms)
            self.assertLessEqual(timing.ci95_low_ms, timing.median_ms)
            self.assertLessEqual(timing.median_ms, timing.ci95_high_ms)
            self.assertGreater(timing.median_ms, 0)
        self.assertGreater(report.ratio, 0)
        self.assertLessEqual(report.ratio_ci95_low, report.ratio)
        self.assertLessEqual(report.ratio, report.ratio_ci95_high)
        with self.assertRaises(self.icd.IcdError) as bad:
            c.measure_latency("lat", mode="generate")
        self.assertEqual(bad.exception.code, "INVALID_ARGUMENT")
        self.assertIn("mode", bad.exception.message)

        alone = self.ctl("--json", "latency", "lat", "--seq-len", "8", "--iters", "6")
        self.assertEqual(int(alone["samples"]), 6)
        self.assertNotIn("compare", alone)
        text = self.ctl("latency", "lat", "--compare", "lat", "--mode", "decode",
                        "--seq-len", "8", "--iters", "6", "--warmup", "0")
        self.assertIn("decode", text)
        self.assertIn("lat / lat:", text)
        self.assertIn("INVALID_ARGUMENT", self.ctl("latency", "lat", "--batch", "-1", expect=3))
        # Hardware counters are read on a GPU: on the CPU both clients get the
        # refusal with its reason, never zeros.
        with self.assertRaises(self.icd.IcdError) as no_counters:
            c.measure_latency("lat", seq_len=8, iters=2, counter_repeats=2)
        self.assertEqual(no_counters.exception.code, "FAILED_PRECONDITION")
        self.assertIn("CUDA device", no_counters.exception.message)
        refused = self.ctl("latency", "lat", "--seq-len", "8", "--counters", "2", expect=9)
        self.assertIn("FAILED_PRECONDITION", refused)
        self.assertIn("counter_repeats", refused)
        r = subprocess.run([ARGS.icdctl, "--help"], capture_output=True, text=True)
        self.assertIn("icdctl --server 127.0.0.1:50051 latency", r.stdout)
        c.unload("lat")

    def test_8g_placement_through_both_clients(self):
        """A model's layers in ranges (on this CPU both ranges are the CPU's):
        reported by ListModels in both clients, equal logits to the model on
        one device, a bad range refused with the field named."""
        c = self.client
        info = c.load("ranged", "mamba1-small/hf", placement="cpu=0-0,cpu=1-1")
        self.assertEqual([(r.device, r.first_layer, r.last_layer) for r in info.placement],
                         [("cpu", 0, 0), ("cpu", 1, 1)])
        self.assertEqual(sum(r.bytes for r in info.placement), info.device_bytes)
        whole = c.load("whole", "mamba1-small/hf")
        self.assertEqual(len(whole.placement), 1)
        ids = list(range(1, 17))
        a = c.evaluate("ranged", ids, batch=2, return_logits=True)["logits"]
        b = c.evaluate("whole", ids, batch=2, return_logits=True)["logits"]
        self.assertEqual(a.tobytes(), b.tobytes())
        listed = self.ctl("--json", "models")
        ranged = next(m for m in listed["models"] if m["name"] == "ranged")
        self.assertEqual([r["device"] for r in ranged["placement"]], ["cpu", "cpu"])
        c.unload("ranged")
        text = self.ctl("load", "ranged", "mamba1-small/hf", "--placement", "cpu=0-0,cpu=1-1")
        self.assertIn("placement   cpu=0-0", text)
        table = self.ctl("models")
        row = next(line for line in table.splitlines() if line.startswith("ranged "))
        self.assertIn(" cpu ", row)  # both ranges on the CPU: one device, named once
        refused = self.ctl("load", "gap", "mamba1-small/hf", "--placement", "cpu=0-0", expect=3)
        self.assertIn("INVALID_ARGUMENT", refused)
        self.assertIn("placement 'cpu=0-0': layers 1-1 are on no device", refused)
        with self.assertRaises(self.icd.IcdError) as both:
            c.load("both", "mamba1-small/hf", device="cpu", placement="cpu=0-1")
        self.assertEqual(both.exception.code, "INVALID_ARGUMENT")
        self.assertIn("give one", both.exception.message)
        c.unload("ranged")
        c.unload("whole")

    def icdctl_with_terminal(self, *args):
        """icdctl with its stderr on a pseudo-terminal and stdout on a pipe:
        (exit code, stdout, what the terminal got)."""
        import pty
        master, slave = pty.openpty()
        proc = subprocess.Popen([ARGS.icdctl, "--server", self.address] + list(args),
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        terminal = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            terminal += chunk
        os.close(master)
        out = proc.communicate(timeout=120)[0]
        return proc.returncode, out.decode(), terminal.decode(errors="replace")

    def test_8f_icdctl_progress_line_on_a_terminal_only(self):
        self.client.load("prog", "mamba1-small/hf")
        self.addCleanup(self.client.unload, "prog")
        code, out, terminal = self.icdctl_with_terminal(
            "latency", "prog", "--seq-len", "256", "--iters", "300")
        self.assertEqual(code, 0, terminal)
        self.assertIn("MeasureLatency samples [", terminal)  # the bar, redrawn in place
        self.assertIn("/300", terminal)
        self.assertTrue(terminal.endswith("\r\x1b[K"), repr(terminal[-40:]))  # cleared at the end
        self.assertIn("MEDIAN MS", out)  # the result, on stdout, after the line went
        # --json, or stderr into a pipe: no progress line.
        code, out, terminal = self.icdctl_with_terminal(
            "--json", "latency", "prog", "--seq-len", "256", "--iters", "300")
        self.assertEqual((code, terminal), (0, ""))
        self.assertEqual(int(json.loads(out)["samples"]), 300)
        piped = subprocess.run([ARGS.icdctl, "--server", self.address, "latency", "prog",
                                "--seq-len", "256", "--iters", "300"],
                               capture_output=True, text=True, timeout=120)
        self.assertEqual((piped.returncode, piped.stderr), (0, ""))

    # ------------------------------------------------------------ shutdown

    def test_9_sigterm_exits_zero(self):
        # A server of its own, holding a model and a client, so that the
        # shared one keeps serving whatever runs after this test.
        from icd_client.local_server import LocalServer
        with LocalServer(ARGS.server_binary, model_roots=[self.models],
                         export_roots=[self.exports]) as srv:
            with self.icd.Client(srv.address, timeout=120) as c:
                c.load("bye", "mamba1-small/hf")
                self.assertTrue(c.health())
            self.assertEqual(srv.stop(timeout_s=60), 0, srv.log())
        self.assertTrue(self.client.health())  # the shared server still serves


if __name__ == "__main__":
    ARGS, rest = parse_args()
    if os.environ.get("ICD_TEST_ORDER") == "reverse":
        unittest.TestLoader.sortTestMethodsUsing = lambda _, a, b: (a < b) - (a > b)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
