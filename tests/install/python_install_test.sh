#!/usr/bin/env bash
# What a user of the Python client does (issue 22): a virtual environment of
# Debian's python3 that sees the system's packages, `pip install` of
# client/python into it (offline: --no-build-isolation --no-index; the
# stubs generated while the wheel is built), then tests/install/python/
# consumer.py run from outside the source tree with no PYTHONPATH or
# ICD_PYTHON_STUBS against the build's icd-server.
#   python_install_test.sh SOURCE_DIR BUILD_DIR FIXTURES_DIR
set -euo pipefail
source_dir=${1:?usage: python_install_test.sh SOURCE_DIR BUILD_DIR FIXTURES_DIR}
build=${2:?}
fixtures=${3:?}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A copy of what pip needs, so that the build leaves nothing in the tree.
mkdir -p "$work/src/client"
cp -r "$source_dir/client/python" "$work/src/client/python"
cp -r "$source_dir/proto" "$work/src/proto"
rm -rf "$work/src/client/python/build" "$work/src/client/python/"*.egg-info

/usr/bin/python3 -m venv --system-site-packages "$work/env"
(cd "$work" && "$work/env/bin/pip" install --no-build-isolation --no-index \
  "$work/src/client/python" > "$work/pip.log" 2>&1) || { cat "$work/pip.log"; exit 1; }
rm -rf "$work/src"  # the consumer must find the installed package, not the copy

cp "$source_dir/tests/install/python/consumer.py" "$work/consumer.py"
cd "$work"
env -u PYTHONPATH -u ICD_PYTHON_STUBS "$work/env/bin/python" "$work/consumer.py" \
  "$build/server/icd-server" "$fixtures/golden" mamba2-groups/hf
echo "python_install_test: icd-client installed with pip into a venv and used from outside the tree"
