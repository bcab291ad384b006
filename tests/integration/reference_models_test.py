#!/usr/bin/python3
"""The shipped reference models (models/*/card.json) through the real
server: each loads in every layout its card lists and its check-slice mean
NLL through Evaluate equals the card's within 1e-4 relative; its first layout's
validation bits per byte over all of validation.txt equal the card's, and every
other layout gives that layout's weights and check-slice logits bit for bit (a
corrupted file or a changed loader shows here); it is trained (bits per byte
measured here well below the unigram baseline on the same text), and the corpus
it names is the one checked in. Then the co-design loop example runs end to end on it.

Run by ctest (tests/integration/CMakeLists.txt):
  /usr/bin/python3 reference_models_test.py --server-binary B --stubs GEN --build BUILD
"""

import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

from clients_test import parse_server_test_args  # one copy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = os.path.join(REPO, "models")
ARGS = None
# "Well below": at most this share of the unigram model's bits per byte.
TRAINED_SHARE = 0.7
# ReadTensors names a tensor as its checkpoint's layout does; mamba_ssm calls
# the embedding what HF's load hook renames.
MAMBA_SSM_NAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def parse_args():
    return parse_server_test_args(__doc__, ("--build", "the build dir (for the loop example)"))


def cards():
    out = []
    for path in sorted(glob.glob(os.path.join(MODELS, "*", "card.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


class ReferenceModelsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        sys.path[:0] = [os.path.join(REPO, "client", "python"), ARGS.stubs]
        import icd_client
        from icd_client.local_server import LocalServer
        cls.exports = tempfile.mkdtemp(prefix="icd-reference-")
        cls.server = LocalServer(ARGS.server_binary, model_roots=[MODELS],
                                 export_roots=[cls.exports])
        cls.client = icd_client.Client(cls.server.address, timeout=300)
        with open(os.path.join(MODELS, "corpus", "validation.txt"), "rb") as f:
            cls.validation = np.frombuffer(f.read(), dtype=np.uint8).astype(np.int64)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        assert cls.server.stop() == 0, cls.server.log()
        shutil.rmtree(cls.exports, ignore_errors=True)

    def test_both_families_ship(self):
        families = {c["family"] for c in cards()}
        self.assertEqual(families, {"mamba1", "mamba2"})
        mamba2 = [c for c in cards() if c["family"] == "mamba2"]
        self.assertTrue(all(c["architecture"]["n_groups"] >= 2 for c in mamba2))
        size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(MODELS, "*", "*", "*")))
        self.assertLessEqual(size, 25 << 20, "the shipped models exceed 25 MB together")

    def test_corpus_is_the_cards_corpus(self):
        with open(os.path.join(MODELS, "corpus", "manifest.json")) as f:
            manifest = json.load(f)
        digest = hashlib.sha256(self.validation.astype(np.uint8).tobytes()).hexdigest()
        self.assertEqual(digest, manifest["validation"]["sha256"])
        for card in cards():
            self.assertEqual(card["corpus"]["validation_sha256"], digest, card["name"])

    def test_every_layout_gives_the_cards_figure(self):
        """The card's check-slice NLL in every layout; the validation figure
        over all of validation.txt in the first layout. A later layout holds
        the same model, so it must give the first layout's weights and its
        check-slice logits bit for bit: the same function of the same
        weights gives the same validation figure, and a corrupted file or a
        changed loader in that layout fails here, without a second sweep."""
        for card in cards():
            check = card["check"]
            rows = self.validation[:check["rows"] * check["seq"]].reshape(check["rows"], check["seq"])
            first = None
            for layout in card["layouts"]:
                with self.subTest(model=card["name"], layout=layout):
                    name = "%s-%s" % (card["name"], layout)
                    info = self.client.load(name, os.path.join(card["name"], layout))
                    self.assertEqual(info.family.replace("_", ""), card["family"])
                    self.assertEqual(info.layout, layout)
                    self.assertEqual(info.parameters, card["parameters"])
                    result = self.client.evaluate(name, rows, return_logits=True)
                    self.assertEqual(result["tokens"], check["rows"] * (check["seq"] - 1))
                    rel = abs(result["mean_nll"] - check["mean_nll"]) / check["mean_nll"]
                    print("[reference] %s/%s: check NLL %.6f, card %.6f, rel %.1e"
                          % (card["name"], layout, result["mean_nll"], check["mean_nll"], rel))
                    self.assertLessEqual(rel, 1e-4)
                    weights = {MAMBA_SSM_NAMES.get(t, t): v
                               for t, v in self.client.read_tensors(name).items()}
                    if first is None:
                        # The card's headline figure: every validation window.
                        bits = self.validation_bits(name, card["validation"]["window"])
                        rel = abs(bits - card["validation"]["bits_per_byte"]) / bits
                        print("[reference] %s/%s: validation %.5f bits/byte, card %.5f, rel %.1e"
                              % (card["name"], layout, bits,
                                 card["validation"]["bits_per_byte"], rel))
                        self.assertLessEqual(rel, 1e-4)
                        first = (layout, weights, result["logits"])
                    else:
                        if "lm_head.weight" in weights and "lm_head.weight" not in first[1]:
                            # A tied head this layout lists: the embedding itself.
                            self.assertEqual(weights.pop("lm_head.weight").tobytes(),
                                             first[1]["backbone.embeddings.weight"].tobytes())
                        self.assertEqual(sorted(weights), sorted(first[1]))
                        for tensor, values in weights.items():
                            self.assertEqual(values.tobytes(), first[1][tensor].tobytes(),
                                             "%s differs from the %s layout's" % (tensor, first[0]))
                        self.assertEqual(result["logits"].tobytes(), first[2].tobytes(),
                                         "check-slice logits differ from the %s layout's" % first[0])
                        print("[reference] %s/%s: %d tensors and the check-slice logits equal "
                              "the %s layout's bit for bit" % (card["name"], layout, len(weights),
                                                                first[0]))
                    self.client.unload(name)

    def validation_bits(self, name, window):
        """Bits per byte over validation.txt in non-overlapping windows, each
        scored from its own start, as models/train.py computes the card's."""
        usable = self.validation.size // window * window
        rows = self.validation[:usable].reshape(-1, window)
        total, count = 0.0, 0
        for start in range(0, rows.shape[0], 16):
            chunk = rows[start:start + 16]
            result = self.client.evaluate(name, chunk)
            total += result["mean_nll"] * result["tokens"]
            count += result["tokens"]
        return total / count / math.log(2)

    def test_trained_not_random(self):
        for card in cards():
            with self.subTest(model=card["name"]):
                unigram = card["validation"]["unigram_bits_per_byte"]
                self.assertLessEqual(card["validation"]["bits_per_byte"], TRAINED_SHARE * unigram)
                # The same claim measured here: the check slice through icd,
                # against a unigram model of the same text.
                check = card["check"]
                rows = self.validation[:check["rows"] * check["seq"]].reshape(check["rows"],
                                                                              check["seq"])
                name = "%s-trained" % card["name"]
                self.client.load(name, os.path.join(card["name"], card["layouts"][0]))
                try:
                    check_bits = self.client.evaluate(name, rows)["mean_nll"] / math.log(2)
                finally:
                    self.client.unload(name)
                self.assertLessEqual(check_bits, TRAINED_SHARE * unigram)
                counts = np.bincount(self.validation, minlength=256) + 1.0
                self.assertGreater(-np.mean(np.log2(counts / counts.sum())[self.validation]),
                                   check_bits * 1.3)

    def test_codesign_loop_example(self):
        started = time.time()
        plots = tempfile.mkdtemp(prefix="icd-codesign-plots-")
        self.addCleanup(shutil.rmtree, plots, True)
        out = subprocess.run([sys.executable, os.path.join(REPO, "client", "python", "examples",
                                                           "codesign_loop.py"),
                              "--build", ARGS.build, "--model", "mamba1-pydoc", "--plots", plots,
                              "--counters", "1", "--json", os.path.join(plots, "loop.json")],
                             capture_output=True, text=True, timeout=600)
        print(out.stdout)
        self.assertEqual(out.returncode, 0, out.stderr[-4000:])
        self.assertIn("checks held", out.stdout)
        for variant in ("dense", "coact", "pruned", "nm+pruned", "re-permuted"):
            self.assertIn(variant, out.stdout)
        # The three figures: PNG files of a plausible size, each named in the output.
        for figure in ("coactivation", "blocks", "nll"):
            path = os.path.join(plots, "mamba1-pydoc-%s.png" % figure)
            self.assertIn("wrote %s" % path, out.stdout)
            with open(path, "rb") as f:
                data = f.read()
            self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n", path)
            self.assertGreater(len(data), 10000, path)
        # --counters on a CPU server: each variant's row names it and carries the
        # refusal (the counters are read on CUDA only), in the table and the JSON.
        with open(os.path.join(plots, "loop.json")) as f:
            counters = json.load(f)["counters"]
        self.assertEqual([row["variant"] for row in counters], ["coact", "pruned", "nm"])
        for row in counters:
            self.assertIn("FAILED_PRECONDITION", row["error"])
            self.assertIn("CUDA device", row["error"])
            self.assertRegex(out.stdout, r"(?m)^%s +.*CUDA device" % row["variant"])
        print("[reference] codesign loop: %.0f s" % (time.time() - started))


if __name__ == "__main__":
    ARGS, rest = parse_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
