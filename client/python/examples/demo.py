#!/usr/bin/python3
"""`make demo`: icd-server on loopback with icd's two trained reference
models (models/: byte-level Mamba-2 and Mamba-1 trained on the Python
documentation) and a hybrid (Zamba2, a golden fixture), driven through the
main job by the Python client (and icdctl for the listings).

For each model: load, list its symmetry groups, apply a random permutation of
every group, verify, evaluate before and after, export, reload the export and
evaluate it again; then capture activations on validation text, compute a permutation
of every group from them (modularity clustering), apply them all and verify;
then a short report. The server is stopped with SIGTERM and
must exit 0. Exit status: 0 when every check held.

  /usr/bin/python3 client/python/examples/demo.py --build build
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
REFERENCE = os.path.join(REPO, "models")
# (root, model, layout): the Mamba-2 (two B/C groups) in HF layout, the
# Mamba-1 in mamba_ssm layout; and a hybrid, transformers' Zamba2 (a shared
# attention + MLP block at three layers beside Mamba-2; a golden fixture, its
# random weights untrained, 41 tokens: the text's bytes are taken modulo 41).
GOLDEN = os.path.join(REPO, "tests", "fixtures", "golden")
MODELS = [(REFERENCE, "mamba2-pydoc", "hf"), (REFERENCE, "mamba1-pydoc", "mamba_ssm"),
          (GOLDEN, "zamba2-small", "hf")]
SEED = 20240601


def text_rows(offset, rows, seq):
    """[rows, seq] byte ids of models/corpus/validation.txt from `offset`
    (the models' vocabulary is the 256 byte values)."""
    with open(os.path.join(REFERENCE, "corpus", "validation.txt"), "rb") as f:
        f.seek(offset)
        data = f.read(rows * seq)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64).reshape(rows, seq)


# Held-out text for the before/after comparisons, and text to capture on.
IDS = text_rows(200000, 2, 128)
CAPTURE = text_rows(100000, 8, 128)


def rel_l2(a, b):
    # icd_client is importable once main() / setUpClass has put the stubs on sys.path.
    from icd_client.local_server import rel_l2 as impl
    return impl(a, b)


def top1(a, b):
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def group_summary(syms):
    parts = []
    for g in syms.groups:
        extra = "".join(", %s %d" % (k, v) for k, v in (("block", g.block), ("whole", g.whole))
                        if v)
        parts.append("%s(%d%s)" % (g.name, g.size, extra))
    return parts


def run_model(client, icd, fixture, layout):
    name = fixture
    ok = True
    info = client.load(name, os.path.join(fixture, layout))
    vocab = info.dims["vocab_size"]
    ids, capture = IDS % vocab, CAPTURE % vocab
    syms = client.symmetries(name)
    before = client.evaluate(name, ids, return_logits=True)
    perms = icd.random_permutations(syms, SEED)
    t0 = time.perf_counter()
    report = client.apply(name, perms, expected_version=info.version)
    call_ms = (time.perf_counter() - t0) * 1e3
    check = client.verify(name)
    after = client.evaluate(name, ids, return_logits=True)
    export = client.export(name, name + "-permuted")
    reloaded_name = name + "-reloaded"
    client.load(reloaded_name, export.path)  # the export root is also a model root
    reloaded = client.evaluate(reloaded_name, ids, return_logits=True)

    c = report.correctness
    drift = rel_l2(after["logits"], before["logits"])
    agree = top1(after["logits"], before["logits"])
    reload_drift = rel_l2(reloaded["logits"], after["logits"])
    ok &= c.ok and check.ok and drift <= c.tolerance and reload_drift <= c.tolerance
    ok &= report.version == info.version + 1 and agree == 1.0

    print("== %s ==" % name)
    print("model      %s: %s (family %s), layout %s, %s on %s, %d parameters, version %d"
          % (info.name, info.architecture or info.family, info.family, info.layout, info.dtype,
             info.device, info.parameters, info.version))
    print("groups     %d: %s" % (len(syms.groups), " ".join(group_summary(syms))))
    print("apply      %d permutations (seed %d): %.3f ms in the server (%.1f ms the call,"
          " with the check); version %d -> %d"
          % (len(report.groups), SEED, report.apply_ms, call_ms, info.version, report.version))
    print("verify     %s: rel_l2 %.2e (tolerance %.0e), max_abs %.2e, top-1 agreement %.2f%%"
          " over %d probe tokens"
          % ("OK" if check.ok else "MISMATCH", check.rel_l2, check.tolerance, check.max_abs,
             100 * check.top1_agreement, check.tokens))
    print("evaluate   %d tokens: rel_l2 after/before %.2e, top-1 agreement %.2f%%"
          % (after["tokens"], drift, 100 * agree))
    print("mean NLL   before %.6f  after %.6f  reloaded export %.6f"
          % (before["mean_nll"], after["mean_nll"], reloaded["mean_nll"]))
    print("export     %s (version %d): %s"
          % (export.path, export.version, ", ".join(export.files)))
    print("reloaded   as %s: rel_l2 vs permuted %.2e" % (reloaded_name, reload_drift))

    # Traces -> π: the server runs the model on tokens, captures every group's
    # activations, solves each group; the permutations apply as they are.
    tokens = capture
    t0 = time.perf_counter()
    results = client.capture_permutation(name, tokens, seeds=2)
    capture_ms = (time.perf_counter() - t0) * 1e3
    traced = client.apply(name, results)
    ok &= traced.correctness.ok and len(results) == len(syms.groups)
    print("capture    %d groups from %d tokens (+%d held out) in %.0f ms; applied all: %s,"
          " rel_l2 %.2e" % (len(results), results[0].tokens, results[0].holdout_tokens,
                            capture_ms, "OK" if traced.correctness.ok else "MISMATCH",
                            traced.correctness.rel_l2))
    print(icd.summarize(results[:4]))
    found = sum(r.structure_found for r in results)
    print("structure  found in %d of %d groups (Q above its shuffled null); the co-design loop"
          " on these models: client/python/examples/codesign_loop.py" % (found, len(results)))
    print("result     %s" % ("PASS" if ok else "FAIL"))
    print()
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(REPO, "build"), help="CMake build dir")
    args = p.parse_args()
    build = os.path.abspath(args.build)
    server_bin = os.path.join(build, "server", "icd-server")
    icdctl = os.path.join(build, "client", "cpp", "icdctl")
    sys.path[:0] = [os.path.join(REPO, "client", "python"),
                    os.path.join(build, "client", "python", "gen")]
    import icd_client as icd

    tmp = tempfile.mkdtemp(prefix="icd-demo-")
    models = os.path.join(tmp, "models")
    exports = os.path.join(tmp, "exports")
    os.makedirs(exports)
    for root, fixture, layout in MODELS:
        shutil.copytree(os.path.join(root, fixture, layout),
                        os.path.join(models, fixture, layout))
    from icd_client.local_server import LocalServer
    with LocalServer(server_bin, model_roots=[models, exports],
                     export_roots=[exports]) as server:
        print("icd-server listening on %s (model root %s)\n" % (server.address, models))
        with icd.Client(server.address, timeout=300) as client:
            print("health     %s\n" % ("SERVING" if client.health() else "NOT SERVING"))
            ok = all([run_model(client, icd, fixture, layout)
                      for _, fixture, layout in MODELS])
        print("$ icdctl --server %s models" % server.address)
        sys.stdout.flush()
        ok &= subprocess.run([icdctl, "--server", server.address, "models"]).returncode == 0
        code = server.stop()
        log_path = server.log_path
    print("\nserver stopped by SIGTERM: exit %d" % code)
    ok &= code == 0
    print("demo %s" % ("PASSED" if ok else "FAILED (server log: %s)" % log_path))
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
        os.remove(log_path)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
