#!/usr/bin/env bash
# The one hard boundary (docs/design.md): LibTorch headers only in server/core,
# gRPC and protobuf headers never there. LibTorch ships its own protobuf
# headers, so a file that mixes them does not build against CUDA LibTorch.
set -u
repo=${1:?usage: boundary_test.sh REPO}
status=0
torch_outside=$(grep -rEln '#include *[<"](torch/|ATen/|c10/|caffe2/)' \
  "$repo/server/rpc" "$repo/server/main.cc" "$repo/client" "$repo/tests/integration" 2>/dev/null)
if [ -n "$torch_outside" ]; then
  echo "LibTorch headers outside server/core:"; echo "$torch_outside"; status=1
fi
grpc_inside=$(grep -rEln '#include *[<"](grpcpp/|grpc/|google/protobuf/)|\.pb\.h' "$repo/server/core")
if [ -n "$grpc_inside" ]; then
  echo "gRPC or protobuf headers inside server/core:"; echo "$grpc_inside"; status=1
fi
public_torch=$(grep -rEln '#include *[<"](torch/|ATen/|c10/)' "$repo/server/core/include")
if [ -n "$public_torch" ]; then
  echo "LibTorch in the engine's public headers:"; echo "$public_torch"; status=1
fi
# The build's budget (docs/build.md): <torch/torch.h> parses nn, optim, jit and
# data besides tensors; first-party code includes server/core/src/torch_api.h.
whole_torch=$(grep -rEln '#include *<torch/(torch|all)\.h>' "$repo/server" "$repo/tests" \
  "$repo/bench" --include='*.cc' --include='*.h' --include='*.cu' 2>/dev/null | grep -v '/bench/peer/')
if [ -n "$whole_torch" ]; then
  echo "<torch/torch.h> instead of torch_api.h:"; echo "$whole_torch"; status=1
fi
[ $status -eq 0 ] && echo "boundary holds: LibTorch only inside server/core/src, no gRPC there"
exit $status
