"""Builds the icd-client wheel with the service's generated stubs.

The stubs (icd/v1/permutation_pb2.py and permutation_pb2_grpc.py) are not
committed: protoc with Debian's grpc_python_plugin (Debian's grpc_tools is too
old for its protobuf) generates them from ../../proto/icd/v1/permutation.proto
into the build tree, as client/python/CMakeLists.txt does for the source tree.
Metadata: pyproject.toml.
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTO = os.path.join("icd", "v1", "permutation.proto")


def _tool(name):
    path = shutil.which(name)
    if path is None:
        raise RuntimeError("icd-client: %s not found (Debian: protobuf-compiler, "
                           "protobuf-compiler-grpc)" % name)
    return path


class BuildWithStubs(build_py):
    """build_py, then the stubs of icd.v1 beside the package."""

    def run(self):
        super().run()
        if not os.path.isfile(os.path.join(PROTO_ROOT, PROTO)):
            raise RuntimeError("icd-client: %s not found under %s: build from the icd "
                               "source tree" % (PROTO, PROTO_ROOT))
        out = os.path.abspath(self.build_lib)
        subprocess.run([_tool("protoc"), "--proto_path=" + PROTO_ROOT, "--python_out=" + out,
                        "--grpc_python_out=" + out,
                        "--plugin=protoc-gen-grpc_python=" + _tool("grpc_python_plugin"),
                        os.path.join(PROTO_ROOT, PROTO)], check=True)
        for package in ("icd", os.path.join("icd", "v1")):
            open(os.path.join(out, package, "__init__.py"), "a").close()


setup(cmdclass={"build_py": BuildWithStubs})
