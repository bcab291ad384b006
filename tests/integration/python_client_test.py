#!/usr/bin/python3
"""The Python client's paths that clients_test.py does not take (issue 15,
finding 8), against the real icd-server binary on 127.0.0.1:0:

- ReadTensors / WriteTensors streams of more than one chunk (a 2 MiB
  embedding, a server with --max-message-mb 1);
- float64 and float16 wire dtypes, the ``dtype=`` override, ``skip_verify``;
- bfloat16 rounding of float32 input: round to nearest even, NaN stays NaN,
  checked bit for bit against PyTorch's own cast (python3-torch, a test oracle)
  over every edge case and 2^20 random bit patterns, and through the server;
- token and TLS credentials (certificates made with openssl at test time) and
  the connect timeout.

Each test starts what it needs; none depends on another's state or order.
Run by ctest (tests/integration/CMakeLists.txt):
  /usr/bin/python3 python_client_test.py --server-binary B --fixtures F --stubs GEN
"""

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

from clients_test import parse_server_test_args, read_safetensors  # one copy each

ARGS = None
icd = None  # icd_client, imported once the stubs are on sys.path


def parse_args():
    return parse_server_test_args(__doc__, ("--fixtures", "tests/fixtures"))


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def torch_bf16_bits(f32):
    """PyTorch's float32 -> bfloat16 cast, as uint16 bits: the oracle."""
    import torch
    t = torch.from_numpy(np.ascontiguousarray(f32, np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


class ModelRoot:
    """A temp model root holding mamba1-small/hf and a copy of it whose
    vocabulary is 8192 (embedding [8192, 64] float32: 2 MiB, more than one
    chunk at --max-message-mb 1 and at the client's 1 MiB − 64 KiB)."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="icd-pyclient-test-")
        self.models = os.path.join(self.tmp, "models")
        self.exports = os.path.join(self.tmp, "exports")
        os.makedirs(self.exports)
        small = os.path.join(ARGS.fixtures, "golden", "mamba1-small", "hf")
        shutil.copytree(small, os.path.join(self.models, "small", "hf"))
        big = os.path.join(self.models, "big-vocab", "hf")
        os.makedirs(big)
        with open(os.path.join(small, "config.json")) as f:
            config = json.load(f)
        config["vocab_size"] = 8192
        with open(os.path.join(big, "config.json"), "w") as f:
            json.dump(config, f)
        weights = dict(read_safetensors(os.path.join(small, "model.safetensors")))
        rng = np.random.default_rng(15)
        emb = weights["backbone.embeddings.weight"]
        extra = rng.standard_normal((8192 - emb.shape[0], emb.shape[1])).astype(np.float32)
        weights["backbone.embeddings.weight"] = np.concatenate([emb, 0.1 * extra])
        write_safetensors(os.path.join(big, "model.safetensors"), weights)
        self.big_embedding = weights["backbone.embeddings.weight"]

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


class Bf16RoundingTest(unittest.TestCase):
    """icd_client's float32 -> bfloat16 encoding against PyTorch's cast."""

    def encode(self, values):
        return icd._f32_to_bf16(np.asarray(values, np.float32))

    def test_edge_cases_bit_for_bit(self):
        bits = np.array([
            0x3F800000,  # 1.0
            0x3F808000,  # halfway between 1.0 and the next bf16, even below: down
            0x3F818000,  # halfway, odd below: up to even
            0x3F808001,  # just above halfway: up
            0x3F807FFF,  # just below halfway: down
            0xBF818000,  # negative halfway: to even
            0x00000000, 0x80000000,  # +0, -0
            0x00000001, 0x007FFFFF, 0x00008000, 0x00018000,  # subnormals, halfway ones
            0x7F7FFFFF,  # largest float: rounds up to +inf
            0x7F7F7FFF,  # largest float that stays finite
            0x7F800000, 0xFF800000,  # +inf, -inf
        ], dtype=np.uint32)
        values = bits.view(np.float32)
        got = self.encode(values)
        np.testing.assert_array_equal(got, torch_bf16_bits(values))
        self.assertEqual(got[1], 0x3F80)
        self.assertEqual(got[2], 0x3F82)
        self.assertEqual(got[3], 0x3F81)
        self.assertEqual(got[12], 0x7F80)

    def test_nan_stays_nan(self):
        # Quiet, signalling, negative and all-ones payloads: adding the
        # rounding bias to 0x7FFFFFFF would carry into the sign (-0).
        bits = np.array([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00000, 0xFFFFFFFF, 0x7FBFFFFF],
                        dtype=np.uint32)
        got = self.encode(bits.view(np.float32))
        np.testing.assert_array_equal(got, np.full(len(bits), 0x7FC0, np.uint16))
        self.assertTrue(np.all(np.isnan(icd._bf16_to_f32(got.tobytes()))))

    def test_random_bit_patterns_match_torch(self):
        bits = np.random.default_rng(7).integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
        values = bits.astype(np.uint32).view(np.float32)
        got, oracle = self.encode(values), torch_bf16_bits(values)
        # NaNs (about 1 in 256 random patterns): PyTorch 1.13's CPU cast writes
        # 0xFFFF, icd_client the canonical 0x7FC0; both are NaN. Every other
        # pattern: the same bits.
        nan = np.isnan(values)
        self.assertGreater(nan.sum(), 1000)
        np.testing.assert_array_equal(got[~nan], oracle[~nan])
        self.assertTrue(np.all(np.isnan(icd._bf16_to_f32(got[nan].tobytes()))))
        self.assertTrue(np.all(np.isnan(icd._bf16_to_f32(oracle[nan].tobytes()))))

    def test_every_bf16_widens_and_rounds_back_exactly(self):
        every = np.arange(1 << 16, dtype=np.uint32).astype("<u2")
        widened = icd._bf16_to_f32(every.tobytes())
        np.testing.assert_array_equal(widened.view(np.uint32), every.astype(np.uint32) << 16)
        finite = ~np.isnan(widened)
        np.testing.assert_array_equal(self.encode(widened)[finite], every[finite])

    def test_float16_and_float64_encodings_round_trip(self):
        for dtype, wire in ((np.float16, "float16"), (np.float64, "float64")):
            values = np.random.default_rng(3).standard_normal((3, 5)).astype(dtype)
            raw = icd._encode(values, wire)
            self.assertEqual(len(raw), values.size * np.dtype(dtype).itemsize)
            back = icd._decode(wire, [3, 5], raw)
            self.assertEqual(back.dtype, dtype)
            np.testing.assert_array_equal(back, values)


class OwnServerTest(unittest.TestCase):
    """A test class with its own icd-server over a ModelRoot (SERVER_ARGS)
    and a client of it, for the class's tests."""

    SERVER_ARGS = ["--quiet"]

    @classmethod
    def setUpClass(cls):
        from icd_client.local_server import LocalServer
        cls.root = ModelRoot()
        cls.server = LocalServer(ARGS.server_binary, model_roots=[cls.root.models],
                                 export_roots=[cls.root.exports], extra_args=cls.SERVER_ARGS)
        cls.client = icd.Client(cls.server.address, timeout=120)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.__exit__(None, None, None)  # SIGTERM, wait, close the log
        cls.root.close()


class WireTest(OwnServerTest):
    """Tensor streams and dtypes against a server whose messages are at most 1 MiB."""

    SERVER_ARGS = ["--max-message-mb", "1", "--quiet"]

    def load(self, name, path, dtype=""):
        self.client.load(name, path, dtype=dtype)
        self.addCleanup(self.client.unload, name)

    def test_tensor_streams_of_several_chunks(self):
        c, name = self.client, "backbone.embeddings.weight"
        self.load("big", "big-vocab/hf")
        # On the wire: the server cuts the 2 MiB tensor to fit 1 MiB messages.
        stream = c._stub.ReadTensors(icd.pb.ReadTensorsRequest(model="big", names=[name]),
                                     timeout=120)
        chunks = list(stream)
        self.assertGreaterEqual(len(chunks), 3)
        self.assertTrue(all(ch.name == name for ch in chunks))
        self.assertEqual([ch.last for ch in chunks], [False] * (len(chunks) - 1) + [True])
        self.assertTrue(all(len(ch.data) < (1 << 20) for ch in chunks))
        self.assertEqual(b"".join(ch.data for ch in chunks),
                         self.root.big_embedding.astype("<f4").tobytes())
        # The client reassembles it.
        read = c.read_tensors("big", [name])[name]
        np.testing.assert_array_equal(read, self.root.big_embedding)
        # And sends one of several chunks: 2 MiB in pieces of 1 MiB − 64 KiB.
        self.assertEqual(-(-read.nbytes // c._chunk_bytes), 3)
        halved = read * np.float32(0.5)  # exact in float32
        self.assertEqual(c.write_tensors("big", {name: halved}, expected_version=1), 2)
        np.testing.assert_array_equal(c.read_tensors("big", [name])[name], halved)
        # Many small chunks reassemble the same way on the server.
        with icd.Client(self.server.address, timeout=120, chunk_bytes=4096) as small:
            self.assertEqual(small.write_tensors("big", {name: read}, expected_version=2), 3)
        np.testing.assert_array_equal(c.read_tensors("big", [name])[name], read)

    def test_float64_wire_dtype(self):
        c = self.client
        self.load("f64", "small/hf", dtype="float64")
        fixture = read_safetensors(os.path.join(self.root.models, "small", "hf",
                                                "model.safetensors"))
        tensors = c.read_tensors("f64")
        for name, array in tensors.items():
            self.assertEqual(array.dtype, np.float64, name)
            np.testing.assert_array_equal(array, fixture[name].astype(np.float64), name)
        norm = "backbone.norm_f.weight"
        finer = tensors[norm] + 1e-12  # not representable in float32: float64 on the wire
        self.assertEqual(c.write_tensors("f64", {norm: finer}, expected_version=1), 2)
        np.testing.assert_array_equal(c.read_tensors("f64", [norm])[norm], finer)

    def test_float16_wire_dtype_is_sent_as_float16(self):
        c = self.client
        self.load("f32", "small/hf")
        norm = "backbone.norm_f.weight"
        half = c.read_tensors("f32", [norm])[norm].astype(np.float16)
        # A float16 array goes as float16, which a float32 model refuses by name.
        with self.assertRaises(icd.IcdError) as wrong:
            c.write_tensors("f32", {norm: half})
        self.assertEqual(wrong.exception.code, "INVALID_ARGUMENT")
        self.assertIn(norm, wrong.exception.message)
        self.assertIn("float16", wrong.exception.message)
        # No float16 model on this CPU (LibTorch 1.13 has no CPU half kernels).
        with self.assertRaises(icd.IcdError) as no_half:
            c.load("f16", "small/hf", dtype="float16")
        self.assertEqual(no_half.exception.code, "INVALID_ARGUMENT")
        self.assertIn("float16 on the CPU", no_half.exception.message)

    def test_dtype_override_and_bf16_rounding_through_the_server(self):
        c = self.client
        self.load("bf", "small/hf", dtype="bfloat16")
        norm = "backbone.norm_f.weight"
        n = c.read_tensors("bf", [norm])[norm].size
        # float32 values at and around bf16 halfway points, and one NaN-free row.
        bits = (np.uint32(0x3F800000) + np.arange(n, dtype=np.uint32) * np.uint32(0x4000))
        values = bits.view(np.float32)
        self.assertEqual(c.write_tensors("bf", {norm: values}, expected_version=1), 2)
        expected = icd._bf16_to_f32(torch_bf16_bits(values).astype("<u2").tobytes())
        np.testing.assert_array_equal(c.read_tensors("bf", [norm])[norm], expected)
        # The override decides the wire dtype: float64 input sent as bfloat16 ...
        self.assertEqual(c.write_tensors("bf", {norm: values.astype(np.float64) * 2},
                                         dtype={norm: "bfloat16"}), 3)
        np.testing.assert_array_equal(c.read_tensors("bf", [norm])[norm], expected * 2)
        # ... and float32 sent as float32, which a bfloat16 model refuses.
        with self.assertRaises(icd.IcdError) as wrong:
            c.write_tensors("bf", {norm: values}, dtype="float32")
        self.assertEqual(wrong.exception.code, "INVALID_ARGUMENT")
        self.assertIn("%s: more than %d bytes sent" % (norm, 2 * n), wrong.exception.message)
        # NaN is refused by the server whatever its encoding.
        poisoned = values.copy()
        poisoned[3] = np.nan
        with self.assertRaises(icd.IcdError) as nan:
            c.write_tensors("bf", {norm: poisoned})
        self.assertIn("element 3 is NaN", nan.exception.message)

    def test_skip_verify(self):
        c = self.client
        self.load("sv", "small/hf")
        perms = c.random_permutations(c.symmetries("sv"), seed=3)
        skipped = c.apply("sv", perms, skip_verify=True)
        self.assertEqual(skipped.version, 2)
        self.assertFalse(skipped.verified)
        self.assertEqual(skipped.correctness.tokens, 0)  # no check ran
        checked = c.apply("sv", perms)
        self.assertEqual(checked.version, 3)
        self.assertTrue(checked.verified)
        self.assertTrue(checked.correctness.ok)
        self.assertGreater(checked.correctness.tokens, 0)


def make_certificates(d):
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", os.path.join(d, "server.key"),
                    "-out", os.path.join(d, "server.pem")], **quiet)


class GraphTest(OwnServerTest):
    """return_graph (issue 22's figures): the statistic's graph the solver
    clustered comes back with the result, in the channel order before the
    permutation; icd_client.graph decodes it and reorders it by the result."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.client.load("g", "small/hf")

    def test_planted_clusters_show_in_the_graph(self):
        rng = np.random.default_rng(21)
        channels, size = 128, 16
        owner = rng.permutation(np.arange(channels) % (channels // size))  # 8 scattered clusters
        latent = rng.standard_normal((3000, channels // size))
        rows = (latent[:, owner] + 0.5 * rng.standard_normal((3000, channels))).astype(np.float32)
        result = self.client.compute_permutation("g", "layers.0.inner", rows, holdout_rows=500,
                                                 seed=2, return_graph=True)
        graph = icd.graph(result)
        self.assertEqual(graph.shape, (channels, channels))
        self.assertTrue(np.allclose(graph, graph.T, atol=1e-6))
        self.assertTrue(np.all(np.diag(graph) == 0) and np.all(graph >= 0))
        same = owner[:, None] == owner[None, :]
        off_diagonal = ~np.eye(channels, dtype=bool)
        within, between = graph[same & off_diagonal].mean(), graph[~same].mean()
        self.assertGreater(within, 5 * between)  # |r| about 0.8 against about 0.02
        # The solved order puts each planted cluster in one aligned block.
        solved = icd.graph(result, solved=True)
        index = np.asarray(result.permutation.index)
        self.assertTrue(np.array_equal(solved, graph[np.ix_(index, index)]))
        diagonal_blocks = np.mean([solved[b:b + size, b:b + size][~np.eye(size, dtype=bool)].mean()
                                   for b in range(0, channels, size)])
        self.assertAlmostEqual(diagonal_blocks, within, delta=0.05 * within)

    def test_absent_unless_asked_and_refused_for_nm(self):
        rows = np.random.default_rng(22).standard_normal((400, 128)).astype(np.float32)
        result = self.client.compute_permutation("g", "layers.0.inner", rows)
        self.assertEqual(result.graph_f32_le, b"")
        self.assertIsNone(icd.graph(result))
        with self.assertRaises(icd.IcdError) as refused:
            self.client.compute_permutation("g", "layers.0.inner", rows,
                                            objective="nm_sparsity", return_graph=True)
        self.assertEqual(refused.exception.code, "INVALID_ARGUMENT")
        self.assertIn("return_graph", refused.exception.message)


class ProgressTest(OwnServerTest):
    """Progress of long calls (issue 22): a call that carries x-icd-request-id
    is followed by GetProgress while it runs and for a minute after; the
    client's ``progress=`` callbacks see its stages advance and its end."""

    def test_latency_reports_samples_as_they_run(self):
        seen = []
        self.client.load("p", "small/hf", progress=seen.append)
        self.assertTrue(seen[-1].finished and seen[-1].code == "OK", seen[-1])
        self.assertEqual((seen[-1].rpc, seen[-1].stage), ("LoadModel", "read"))
        self.addCleanup(self.client.unload, "p")
        seen = []
        # Long enough (a second or more) for the client's polls, every 0.2 s,
        # to see it run on a fast machine too: at seq_len 256 it took 0.2 s.
        report = self.client.measure_latency("p", seq_len=2048, warmup=2, iters=300,
                                             progress=seen.append)
        self.assertEqual(report.samples, 300)
        running = [p for p in seen if not p.finished]
        self.assertTrue(running, "no report while the call ran")  # live, not only the end
        samples = [p.done for p in running if p.stage == "samples"]
        self.assertEqual(samples, sorted(samples))
        self.assertTrue(all(p.total == 300 for p in running if p.stage == "samples"))
        last = seen[-1]
        self.assertTrue(last.finished)
        self.assertEqual((last.rpc, last.code, last.stage, last.done, last.total),
                         ("MeasureLatency", "OK", "samples", 300, 300))
        self.assertGreater(last.elapsed_s, 0)
        # Asked again by its ID after the end: the same final state.
        again = self.client.progress(last.request_id)
        self.assertEqual((again.finished, again.done), (True, 300))

    def test_tqdm_shows_the_documented_bar(self):
        # docs/clients.md's tqdm snippet, as written, on a latency run: the bar
        # ends full, named by the last stage, and drew as the call ran.
        from tqdm import tqdm
        self.client.load("t", "small/hf")
        self.addCleanup(self.client.unload, "t")
        out = io.StringIO()
        bar = tqdm(file=out, mininterval=0)
        def show(p):
            bar.set_description(p.stage)
            bar.total = p.total or None
            bar.n = p.done
            bar.refresh()
        # seq_len 2048: over a second, so the 0.2 s polls see the bar move
        # (at 256, 200 samples took 0.2 s on an idle machine: no partial bar).
        report = self.client.measure_latency("t", seq_len=2048, warmup=2, iters=200, progress=show)
        bar.close()
        self.assertEqual(report.samples, 200)
        self.assertEqual((bar.n, bar.total), (200, 200))
        lines = [line for line in out.getvalue().replace("\r", "\n").split("\n") if line.strip()]
        self.assertTrue(lines[-1].startswith("samples: 100%"), lines[-1])
        self.assertIn("200/200", lines[-1])
        partial = [line for line in lines if "samples:" in line and "/200" in line
                   and "200/200" not in line]
        self.assertTrue(partial, "no bar drawn while the call ran: %r" % lines[-5:])

    def test_capture_counts_groups(self):
        self.client.load("c", "small/hf")
        self.addCleanup(self.client.unload, "c")
        seen = []
        ids = np.arange(256, dtype=np.int64).reshape(2, 128) % 100
        results = self.client.capture_permutation("c", ids, progress=seen.append)
        last = seen[-1]
        self.assertEqual((last.rpc, last.stage, last.finished), ("CapturePermutation", "solve", True))
        self.assertEqual((last.done, last.total), (len(results), len(results)))
        self.assertTrue({p.stage for p in seen} <= {"forward", "solve"})

    def test_unknown_and_duplicate_ids(self):
        with self.assertRaises(icd.IcdError) as unknown:
            self.client.progress("never-used")
        self.assertEqual(unknown.exception.code, "NOT_FOUND")
        self.client.load("d", "small/hf")
        self.addCleanup(self.client.unload, "d")
        from icd.v1 import permutation_pb2 as pb
        metadata = (("x-icd-request-id", "same-id"),)
        running = self.client._stub.MeasureLatency.future(
            pb.LatencyRequest(model="d", seq_len=256, iters=400), timeout=120, metadata=metadata)
        for _ in range(200):  # until the server has begun it
            try:
                if not self.client.progress("same-id").finished:
                    break
            except icd.IcdError:
                pass
            time.sleep(0.01)
        with self.assertRaises(icd.IcdError) as duplicate:
            self.client._call(self.client._stub.ListModels, pb.ListModelsRequest(),
                              metadata=metadata)
        self.assertEqual(duplicate.exception.code, "ALREADY_EXISTS")
        self.assertEqual(running.result().samples, 400)
        # Ended: the ID may be used again.
        self.client._call(self.client._stub.ListModels, pb.ListModelsRequest(), metadata=metadata)


class OutOfMemoryTest(OwnServerTest):
    """An allocation that fails inside a call (issue 20: a CUDA out-of-memory
    that happens anyway) is RESOURCE_EXHAUSTED saying so, not INTERNAL, and
    leaves the server and its models as they were. Without a GPU: the
    server's address space is capped (RLIMIT_AS) just above what it uses, so
    the forward's first large tensor cannot be allocated."""

    SERVER_ARGS = ["--quiet", "--max-tokens", "2000000"]

    def test_a_failed_allocation_is_resource_exhausted(self):
        import resource
        self.client.load("mem", "small/hf")
        self.addCleanup(self.client.unload, "mem")
        before = self.client.verify("mem")
        pid = self.server.proc.pid
        with open("/proc/%d/status" % pid) as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        ids = np.full((1, 400_000), 5, dtype=np.int64)  # the embedding alone: 4e5 x 64 x 4 bytes
        old = resource.prlimit(pid, resource.RLIMIT_AS, (size + (48 << 20), resource.RLIM_INFINITY))
        try:
            with self.assertRaises(icd.IcdError) as exhausted:
                self.client.evaluate("mem", ids)
        finally:
            resource.prlimit(pid, resource.RLIMIT_AS, old)
        self.assertEqual(exhausted.exception.code, "RESOURCE_EXHAUSTED")
        self.assertIn("out of memory", exhausted.exception.message)
        self.assertIn("bytes asked for", exhausted.exception.message)
        self.assertNotIn("frame #", exhausted.exception.message)  # no backtrace to the client
        # The model and the server as they were.
        after = self.client.verify("mem")
        self.assertTrue(after.ok)
        self.assertEqual((after.rel_l2, after.max_abs), (before.rel_l2, before.max_abs))
        self.assertTrue(self.client.health())
        self.assertEqual(self.client.evaluate("mem", ids[:, :64])["tokens"], 63)


def nemotron_h_checkpoint(directory, seed=29):
    """A random Nemotron-H (issue 19) in transformers' own names (model.*):
    layers M (Mamba-2) * (attention) - (ReLU² MLP) E (experts), the shapes as
    transformers' NemotronH builds them for this config.json."""
    config = {"model_type": "nemotron_h", "hybrid_override_pattern": "M*-E",
              "hidden_size": 16, "vocab_size": 40, "mamba_num_heads": 4, "mamba_head_dim": 8,
              "n_groups": 2, "ssm_state_size": 4, "conv_kernel": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 6, "intermediate_size": 20,
              "n_routed_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 5,
              "moe_shared_expert_intermediate_size": 6}
    d, inner, conv = 16, 32, 32 + 2 * 2 * 4
    shapes = {"model.embeddings.weight": (40, d), "model.norm_f.weight": (d,),
              "lm_head.weight": (40, d)}
    for i in range(4):
        shapes["model.layers.%d.norm.weight" % i] = (d,)
    m = "model.layers.0.mixer."
    shapes.update({m + "in_proj.weight": (2 * inner + 2 * 2 * 4 + 4, d),
                   m + "conv1d.weight": (conv, 1, 4), m + "conv1d.bias": (conv,),
                   m + "dt_bias": (4,), m + "A_log": (4,), m + "D": (4,),
                   m + "norm.weight": (inner,), m + "out_proj.weight": (d, inner)})
    a = "model.layers.1.mixer."
    shapes.update({a + "q_proj.weight": (24, d), a + "k_proj.weight": (12, d),
                   a + "v_proj.weight": (12, d), a + "o_proj.weight": (d, 24)})
    shapes.update({"model.layers.2.mixer.up_proj.weight": (20, d),
                   "model.layers.2.mixer.down_proj.weight": (d, 20)})
    e = "model.layers.3.mixer."
    shapes.update({e + "gate.weight": (3, d), e + "gate.e_score_correction_bias": (3,),
                   e + "shared_experts.up_proj.weight": (6, d),
                   e + "shared_experts.down_proj.weight": (d, 6)})
    for j in range(3):
        shapes[e + "experts.%d.up_proj.weight" % j] = (5, d)
        shapes[e + "experts.%d.down_proj.weight" % j] = (d, 5)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted(shapes.items()):
        values = rng.standard_normal(shape)
        if name.endswith("A_log"):
            values = np.log(rng.random(shape) * 8 + 0.5)
        elif "norm" in name and name.endswith("weight"):
            values = 1 + 0.3 * values
        elif len(shape) == 2:
            values = values / np.sqrt(shape[1])
        else:
            values = 0.3 * values
        weights[name] = values.astype(np.float32)
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    write_safetensors(os.path.join(directory, "model.safetensors"), weights)
    return config


class HybridTest(OwnServerTest):
    """A hybrid through the real service and the Python client (issue 19):
    Nemotron-H with Mamba-2, attention, MLP and experts layers, stored under
    transformers' names; loaded, every group captured, solved and applied,
    verified, exported under the same names and reloaded with the same
    logits."""

    def test_nemotron_h_round_trip(self):
        nemotron_h_checkpoint(os.path.join(self.root.models, "nemotron"))
        info = self.client.load("h", "nemotron")
        self.addCleanup(self.client.unload, "h")
        self.assertEqual((info.architecture, info.family), ("nemotron_h", "mamba2"))
        groups = self.client.symmetries("h").groups
        names = [g.name for g in groups]
        for expected in ("residual", "layers.0.heads", "layers.1.heads", "layers.1.value_dims",
                         "layers.1.key_dims", "layers.2.mlp", "layers.3.expert_hidden.2",
                         "layers.3.shared_expert"):
            self.assertIn(expected, names)
        tensors = {m.tensor for g in groups for m in g.members}
        self.assertIn("model.layers.3.mixer.experts.2.down_proj.weight", tensors)
        self.assertTrue(all(t.startswith("model.") or t == "lm_head.weight" for t in tensors))
        ids = (np.arange(2 * 24, dtype=np.int64).reshape(2, 24) * 7 + 3) % 40
        before = self.client.evaluate("h", ids, return_logits=True)["logits"]
        results = self.client.capture_permutation("h", ids)
        self.assertEqual([r.permutation.group for r in results], names)
        report = self.client.apply("h", results)
        self.assertTrue(report.correctness.ok, report.correctness)
        self.assertEqual(report.correctness.top1_agreement, 1.0)
        self.assertTrue(self.client.verify("h").ok)
        report = self.client.export("h", "nemotron-permuted")
        exported = dict(read_safetensors(os.path.join(report.path, "model.safetensors")))
        stored = dict(read_safetensors(os.path.join(self.root.models, "nemotron",
                                                    "model.safetensors")))
        self.assertEqual(set(exported), set(stored))
        shutil.copytree(report.path, os.path.join(self.root.models, "nemotron-permuted"))
        self.client.load("h2", "nemotron-permuted")
        self.addCleanup(self.client.unload, "h2")
        after = self.client.evaluate("h2", ids, return_logits=True)["logits"]
        self.assertLess(np.linalg.norm(after - before) / np.linalg.norm(before), 1e-5)


class CredentialsTest(unittest.TestCase):
    """Token and TLS as the Python client sends them, and its connect timeout."""

    def setUp(self):
        self.root = ModelRoot()
        self.addCleanup(self.root.close)

    def server(self, *extra):
        from icd_client.local_server import LocalServer
        srv = LocalServer(ARGS.server_binary, model_roots=[self.root.models],
                          export_roots=[self.root.exports], extra_args=list(extra) + ["--quiet"])
        self.addCleanup(srv.__exit__, None, None, None)  # SIGTERM, wait, close the log
        return srv

    def test_token(self):
        token_file = os.path.join(self.root.tmp, "token")
        with open(token_file, "w") as f:
            f.write("s3cret-for-this-test\n")
        srv = self.server("--token-file", token_file)
        with icd.Client(srv.address, token="s3cret-for-this-test", timeout=60) as c:
            self.assertEqual(c.load("t", "small/hf").version, 1)
            self.assertEqual([m.name for m in c.models()], ["t"])
        for token in (None, "wrong"):
            with icd.Client(srv.address, token=token, timeout=60) as c:
                self.assertTrue(c.health())  # health needs no token
                with self.assertRaises(icd.IcdError) as refused:
                    c.models()
                self.assertEqual(refused.exception.code, "UNAUTHENTICATED", token)

    def test_tls(self):
        import grpc
        make_certificates(self.root.tmp)
        srv = self.server("--tls-cert", os.path.join(self.root.tmp, "server.pem"),
                          "--tls-key", os.path.join(self.root.tmp, "server.key"))
        with open(os.path.join(self.root.tmp, "server.pem"), "rb") as f:
            trusted = grpc.ssl_channel_credentials(root_certificates=f.read())
        with icd.Client(srv.address, credentials=trusted, timeout=60) as c:
            self.assertEqual(c.load("tls", "small/hf").family, "mamba1")
            self.assertTrue(c.verify("tls").ok)
        # Plaintext never gets a channel to a TLS server.
        with self.assertRaises(icd.IcdError) as plain:
            icd.Client(srv.address, connect_timeout=1.0)
        self.assertEqual(plain.exception.code, "UNAVAILABLE")

    def test_connect_timeout(self):
        # A socket that listens but never speaks HTTP/2: TCP connects, the
        # channel never becomes ready. Kept open for the whole test.
        silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        start = time.monotonic()
        with self.assertRaises(icd.IcdError) as timed_out:
            icd.Client(address, connect_timeout=0.5)
        self.assertEqual(timed_out.exception.code, "UNAVAILABLE")
        self.assertIn("within 0.5 s", timed_out.exception.message)
        self.assertLess(time.monotonic() - start, 30)  # bounded, not a speed test


if __name__ == "__main__":
    ARGS, rest = parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path[:0] = [os.path.join(repo, "client", "python"), ARGS.stubs]
    import icd_client as icd  # noqa: E402 (needs the stubs path)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
