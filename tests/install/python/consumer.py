"""What a user of the Python client does after `pip install` (issue 22): from
outside the source tree, with no environment variable set, icd_client and its
stubs come from the installed package; it starts icd-server on loopback,
loads a model, applies a random permutation of every group (verified by the
server), and evaluates before and after: the logits agree.

  consumer.py ICD_SERVER MODEL_ROOT MODEL      exit 0 when every check held
"""

import os
import sys
import tempfile

import numpy as np

import icd_client
from icd_client import Client
from icd_client.local_server import LocalServer, rel_l2


def main():
    server_bin, model_root, model = sys.argv[1:4]
    installed = os.path.dirname(os.path.abspath(icd_client.__file__))
    print("icd_client from %s" % installed)
    if "site-packages" not in installed:
        print("FAILED: icd_client was not imported from an installed package")
        return 1
    exports = tempfile.mkdtemp(prefix="icd-python-consumer-")
    ids = (np.arange(64, dtype=np.int64).reshape(2, 32) * 7) % 64
    with LocalServer(server_bin, model_roots=[model_root], export_roots=[exports]) as server:
        with Client(server.address, timeout=120) as client:
            client.load("m", model)
            groups = client.symmetries("m")
            before = client.evaluate("m", ids, return_logits=True)["logits"]
            report = client.apply("m", client.random_permutations(groups, seed=7))
            after = client.evaluate("m", ids, return_logits=True)["logits"]
        code = server.stop()
    distance = rel_l2(after, before)
    print("%s: %d groups applied, version %d, verify rel_l2 %.3g (ok %s); logits after vs "
          "before rel_l2 %.3g; server exit %d"
          % (model, len(groups.groups), report.version, report.correctness.rel_l2,
             report.correctness.ok, distance, code))
    ok = report.correctness.ok and distance < 1e-4 and code == 0 and len(groups.groups) > 0
    print("python consumer %s" % ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
