#!/usr/bin/env bash
# Checks what can be checked of the deployment files without Docker or a
# cluster: the top-level Dockerfile with dockerfile-utils (the linter behind VS Code's
# Docker support; from npm, pinned) and that every YAML file parses.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
npx --yes dockerfile-utils@0.16.3 lint "$here/../Dockerfile"
/usr/bin/python3 - "$here"/k8s/*.yaml "$here"/compose.yaml <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    documents = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    print(f"{path}: {len(documents)} document(s) parse")
PY
echo "deploy/lint.sh: ok"
