#!/usr/bin/env bash
# Builds icd-server and the unit tests against PyTorch's bundled (CUDA)
# LibTorch, with Debian bookworm's gRPC 1.51 / protobuf 3.21 / abseil taken
# from .deb files unpacked into a prefix (no root, no network needed), then
# runs the unit tests and the GPU smoke test (cuda_test).
# The recipe of docs/gpu-build.md (shared docs), as a script.
#
# Usage: deploy/build-gpu.sh [BUILD_DIR]        (default: build-gpu)
#        deploy/build-gpu.sh --help
#
# Prepare the .debs once, on a machine with network, in the repo root
# (/.debs/ is git-ignored):
#   mkdir -p .debs && cd .debs && apt-get download $ICD_GPU_DEBS
# (the list is printed by --help). Carry .debs to the GPU machine.
#
# Environment:
#   ICD_DEBS_DIR      folder of .deb files to unpack       (default: <repo>/.debs)
#   ICD_DEB_PREFIX    where they are unpacked              (default: /tmp/deb)
#   ICD_BUILD_TYPE    CMAKE_BUILD_TYPE                     (default: RelWithDebInfo)
#   ICD_JOBS          parallel build jobs                  (default: $(nproc))
#   ICD_TORCH_PREFIX  LibTorch's CMake prefix              (default: from python3's torch)
#   ICD_CUDA_ARCH     TORCH_CUDA_ARCH_LIST if unset        (default: 9.0, Hopper)
#   ICD_RUN_TESTS     1: run ctest -L unit and cuda_test   (default: 1)
#   ICD_REQUIRE_CUDA  1: fail when CUDA is not available or cuda_test skips
#                     (default: 1; 0 to build/test on a CPU-only torch)
#   ICD_COMMIT        commit recorded in versions.txt (default: git rev-parse HEAD)
#   ICD_BUILD_BENCH   1: also build bench/ (never fatal)      (default: 1)
#   ICD_TARGETS       if set, build only these targets (e.g. "cuda_test
#                     apply_bench") and stop: a quick rebuild for one figure
#   ICD_LOG_DIR       if set, logs are written there as well (configure,
#                     build, ctest, cuda_test, versions)
#
# Notes (docs/gpu-build.md "Pitfalls"):
#  - LibTorch's bundled protobuf headers would shadow Debian's: icd_core is a
#    SHARED library keeping torch PRIVATE, so icd-server never sees them.
#  - protobuf::libprotobuf does not reach icd-server's link line there
#    (ld: "DSO missing from command line" for libicd_rpc.a's protobuf
#    symbols, seen 2026-11-28): PyTorch's Caffe2Config makes it an alias of
#    an empty "dummy" target. The top-level CMakeLists links libprotobuf by
#    path in that case (ICD_PROTOBUF_LIBRARY, which install(EXPORT) also
#    needs); libprotobuf.so is still appended through
#    CMAKE_CXX_STANDARD_LIBRARIES (with --as-needed, so targets that do not
#    use it do not get it).
#  - PyTorch's libtorch_cpu.so exports its own (static) copies of libstdc++'s
#    std::filesystem functions; when libtorch precedes libstdc++ in an
#    executable's DT_NEEDED they win, and temp_directory_path and friends
#    segfault (seen on the H200, 2026-11-28; LD_PRELOAD of the system
#    libstdc++ made the crashes go away). Until the link order is fixed
#    (putting -lstdc++ first in CMAKE_EXE_LINKER_FLAGS did NOT change the
#    DT_NEEDED order there), tests and the server run with the system
#    libstdc++ preloaded: ICD_PRELOAD_LIBSTDCXX=1 (default).
#  - CPATH and friends are unset so that no stray include path wins.
#  - googletest and nlohmann_json come from the .debs too (libgtest-dev,
#    libgmock-dev, nlohmann-json3-dev) because the GPU image lacks them;
#    found through CMAKE_PREFIX_PATH <prefix>/usr (lib/.../cmake/GTest,
#    share/cmake/nlohmann_json).
set -euo pipefail

ICD_GPU_DEBS="libgrpc++-dev libgrpc-dev libgrpc++1.51 libgrpc29 protobuf-compiler-grpc \
protobuf-compiler libprotoc32 libprotobuf-dev libprotobuf32 libprotobuf-lite32 libabsl-dev \
libabsl20220623 libc-ares-dev libc-ares2 libre2-dev libre2-9 nlohmann-json3-dev libgtest-dev \
libgmock-dev libmicrohttpd-dev libmicrohttpd12"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "Debian packages (bookworm): $ICD_GPU_DEBS"
  exit 0
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${1:-build-gpu}"
[[ "$BUILD_DIR" = /* ]] || BUILD_DIR="$REPO/$BUILD_DIR"
DEBS_DIR="${ICD_DEBS_DIR:-$REPO/.debs}"
PREFIX="${ICD_DEB_PREFIX:-/tmp/deb}"
BUILD_TYPE="${ICD_BUILD_TYPE:-RelWithDebInfo}"
JOBS="${ICD_JOBS:-$(nproc)}"
RUN_TESTS="${ICD_RUN_TESTS:-1}"
REQUIRE_CUDA="${ICD_REQUIRE_CUDA:-1}"
LOG_DIR="${ICD_LOG_DIR:-}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${ICD_CUDA_ARCH:-9.0}}"

log() { echo "[build-gpu] $*" >&2; }
# run_logged NAME CMD...: runs CMD, tee'ing to $LOG_DIR/NAME.log when set.
run_logged() {
  local name="$1"; shift
  if [[ -n "$LOG_DIR" ]]; then
    mkdir -p "$LOG_DIR"
    "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    return "${PIPESTATUS[0]}"
  fi
  "$@"
}

# 1. Debian's gRPC / protobuf / abseil (+ gtest, nlohmann_json) into $PREFIX.
if compgen -G "$DEBS_DIR/*.deb" > /dev/null; then
  log "unpacking $(ls "$DEBS_DIR"/*.deb | wc -l) .debs from $DEBS_DIR into $PREFIX"
  mkdir -p "$PREFIX"
  for f in "$DEBS_DIR"/*.deb; do dpkg -x "$f" "$PREFIX"; done
else
  log "no .debs in $DEBS_DIR: using what $PREFIX and the system already hold"
fi
LIBDIR="$PREFIX/usr/lib/x86_64-linux-gnu"
export PATH="$PREFIX/usr/bin:$PATH"
export LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LIBRARY_PATH="$LIBDIR${LIBRARY_PATH:+:$LIBRARY_PATH}"  # -lre2 needs it
unset CPATH CPLUS_INCLUDE_PATH C_INCLUDE_PATH

# 2. LibTorch: PyTorch's bundled one unless told otherwise.
TORCH_PREFIX="${ICD_TORCH_PREFIX:-$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')}"
TORCH_INFO="$(python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "cxx11abi", torch.compiled_with_cxx11_abi())' 2>/dev/null || echo "torch: python3 import failed")"
log "$TORCH_INFO"
if [[ "$REQUIRE_CUDA" == 1 && "$TORCH_INFO" != *"available True"* ]]; then
  log "CUDA is not available to torch (set ICD_REQUIRE_CUDA=0 to build anyway)"
  exit 1
fi
if [[ -n "$LOG_DIR" ]]; then
  mkdir -p "$LOG_DIR"
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: ${ICD_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}"
    echo "uncommitted changes:"; git -C "$REPO" status --short 2>/dev/null || true
    echo "$TORCH_INFO"
    echo "torch cmake prefix: $TORCH_PREFIX"
    cmake --version | head -1
    c++ --version | head -1
    command -v nvcc > /dev/null && nvcc --version | tail -2
    command -v nvidia-smi > /dev/null && nvidia-smi
    echo "protoc: $(protoc --version)"
    echo "nproc: $(nproc)"
  } > "$LOG_DIR/versions.txt" 2>&1 || true
fi

# 3. Configure.
run_logged configure cmake -S "$REPO" -B "$BUILD_DIR" -G "Unix Makefiles" \
  -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
  -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$LIBDIR/cmake;$PREFIX/usr" \
  -DProtobuf_PROTOC_EXECUTABLE="$PREFIX/usr/bin/protoc" \
  -DProtobuf_INCLUDE_DIR="$PREFIX/usr/include" \
  -DProtobuf_LIBRARY="$LIBDIR/libprotobuf.so" \
  -DCMAKE_CXX_STANDARD_LIBRARIES="-Wl,--as-needed $LIBDIR/libprotobuf.so" \
  -DICD_TEST_PYTHON="$(command -v python3)" \
  -DICD_GRPC_PYTHON_PLUGIN="$PREFIX/usr/bin/grpc_python_plugin" \
  -DICD_BUILD_TESTS=ON -DICD_BUILD_SERVICE=ON

if [[ -n "${ICD_TARGETS:-}" ]]; then
  run_logged build-targets cmake --build "$BUILD_DIR" -j"$JOBS" --target ${ICD_TARGETS} || exit 1
  log "built ${ICD_TARGETS} (ICD_TARGETS: nothing else built, no test run)"
  exit 0
fi

# 4. Build every unit test binary, then icd-server (a server link failure
#    does not keep the tests from running; it still fails the script).
UNIT_TARGETS=$(sed -n 's/^icd_unit_test(\([A-Za-z0-9_]*\).*/\1/p' "$REPO/tests/unit/CMakeLists.txt")
log "building $(echo $UNIT_TARGETS) icd-server with -j$JOBS"
status=0
# The Makefiles' top level is .NOTPARALLEL (named targets build one after
# another, ~25 s each against CUDA LibTorch); the directory's own Makefile
# builds all of tests/unit in parallel.
run_logged build-tests make -C "$BUILD_DIR/tests/unit" -j"$JOBS" all || exit 1
run_logged build-server cmake --build "$BUILD_DIR" -j"$JOBS" --target icd-server || {
  log "icd-server failed to build"; status=1; }
[[ "$status" == 0 ]] && "$BUILD_DIR/server/icd-server" --help > /dev/null 2>&1 &&
  log "icd-server runs (--help)"
# Benchmarks (bench/): built when asked, never fatal to the script.
if [[ "${ICD_BUILD_BENCH:-1}" == 1 && -d "$BUILD_DIR/bench" ]]; then
  run_logged build-bench cmake --build "$BUILD_DIR" -j"$JOBS" --target benches ||
    log "some benchmarks failed to build"
fi

[[ "$RUN_TESTS" == 1 ]] || { log "built (tests not run)"; exit "$status"; }

# 5. Unit tests (cuda_test among them), then the smoke test alone, verbose.
if [[ "${ICD_PRELOAD_LIBSTDCXX:-1}" == 1 ]]; then
  export LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6)${LD_PRELOAD:+:$LD_PRELOAD}"
  log "LD_PRELOAD=$LD_PRELOAD (PyTorch's std::filesystem copies; see the notes)"
fi
# The GPU tests (label gpu, among -L unit) fail instead of skipping without a
# device when ICD_REQUIRE_CUDA=1 (tests/unit/test_util.h).
export ICD_REQUIRE_CUDA="$REQUIRE_CUDA"
run_logged ctest ctest --test-dir "$BUILD_DIR" -L unit --output-on-failure || status=1
run_logged cuda_test "$BUILD_DIR/tests/unit/cuda_test" || status=1
if [[ "$REQUIRE_CUDA" == 1 && -n "$LOG_DIR" ]] && grep -q '\[  SKIPPED \]' "$LOG_DIR/cuda_test.log"; then
  log "cuda_test skipped although CUDA was required"; status=1
fi
if [[ "$status" == 0 ]]; then log "OK: unit tests and GPU smoke test passed"; else log "FAILED"; fi
exit "$status"
