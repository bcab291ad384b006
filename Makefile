# Two commands on a fresh machine: `make demo` and `make test`.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

DEB_PACKAGES := cmake g++ make ninja-build ccache pkg-config libtorch-dev libgrpc++-dev protobuf-compiler-grpc \
  libprotobuf-dev libabsl-dev googletest libgtest-dev nlohmann-json3-dev libmicrohttpd-dev \
  python3-grpcio python3-protobuf python3-torch python3-numpy python3-igraph \
  python3-venv python3-pip python3-setuptools python3-wheel python3-matplotlib python3-tqdm \
  libopenblas0-pthread clang libclang-rt-14-dev openssl
# Node and npm bring `buf` (npm @bufbuild/buf) for the clients test. Installed
# from Debian only when no npm is on PATH (a NodeSource nodejs already ships
# npm, and Debian's npm package would conflict with it).
NODE_DEB_PACKAGES := nodejs npm
BUF_VERSION := 1.75.0

.PHONY: deps configure build tools test test-ctest test-benches test-fuzz-build bench demo clean

# Installs the Debian packages the build and the tests need (root, apt).
# dpkg without an fsync per file: a fresh machine's set-up, where an
# interrupted install is simply run again.
APT_UNSAFE_IO := -o Dpkg::Options::=--force-unsafe-io
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_UNSAFE_IO) $$missing; \
	fi
	@if ! command -v npm >/dev/null 2>&1; then \
	  echo "installing: $(NODE_DEB_PACKAGES)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_UNSAFE_IO) $(NODE_DEB_PACKAGES); \
	fi

# Ninja for a new build tree (an existing one keeps the generator it has).
configure: deps
	@if [ -f $(BUILD)/CMakeCache.txt ]; then cmake -S . -B $(BUILD) $(CMAKE_FLAGS); \
	else cmake -S . -B $(BUILD) -G Ninja $(CMAKE_FLAGS); fi

build: configure
	cmake --build $(BUILD) -j $(JOBS)

# buf (grpcurl's stand-in: `buf curl` speaks gRPC + reflection), npm-installed
# into the build tree; the binary ships inside the npm package.
tools: deps
	@test -x $(BUILD)/tools/node_modules/.bin/buf || \
	  npm install --prefix $(BUILD)/tools --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION)

# ctest, then the libFuzzer targets (clang, ASan/UBSan) for a bounded time.
FUZZ_SECONDS ?= 30
# GPU tests (ctest label gpu) are left out explicitly, and counted, so that a
# CPU run never reports them as passed; deploy/build-gpu.sh runs them on a GPU
# with ICD_REQUIRE_CUDA=1, where a skip fails.
# ctest runs beside two compiles at the lowest priority: the benchmarks (not
# in `all`; no test runs them) and the fuzz targets. Tests wait on servers,
# sockets and timeouts about a tenth of the time; the compiles take that
# (docs/build.md). Then the fuzz targets run, each for FUZZ_SECONDS.
test: build tools
	@$(MAKE) --no-print-directory -j 3 test-ctest test-benches test-fuzz-build
	ICD_JOBS=$(JOBS) ICD_FUZZ_STEPS=run bash tests/fuzz/run.sh $(FUZZ_SECONDS) $(CURDIR)/$(BUILD)-fuzz

test-ctest:
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) -LE gpu
	@cd $(BUILD) && n=$$(ctest -N -L gpu | sed -n 's/^Total Tests: //p') && \
	  echo "make test: $$n GPU tests (label gpu) not run on this machine:" \
	    $$(ctest -N -L gpu | sed -n 's/^ *Test *#[0-9]*: //p')

# Output in a log, shown when the build fails.
test-benches:
	@nice -n 19 cmake --build $(BUILD) -j $(JOBS) --target benches > $(BUILD)/benches.log 2>&1 || \
	  { cat $(BUILD)/benches.log; exit 1; }
	@echo "make test: benchmarks built ($(BUILD)/benches.log)"

test-fuzz-build:
	@mkdir -p $(BUILD)-fuzz
	@ICD_JOBS=$(JOBS) ICD_FUZZ_STEPS=build nice -n 19 bash tests/fuzz/run.sh $(FUZZ_SECONDS) \
	  $(CURDIR)/$(BUILD)-fuzz > $(BUILD)-fuzz/build.log 2>&1 || { cat $(BUILD)-fuzz/build.log; exit 1; }
	@echo "make test: fuzz targets built ($(BUILD)-fuzz/build.log)"

bench: build
	cmake --build $(BUILD) -j $(JOBS) --target benches

# icd-server on loopback with two fixture models (Mamba-2 HF, Mamba-1
# mamba_ssm), the clients through load/apply/verify/evaluate/export/reload, a
# report, SIGTERM. The logic: client/python/examples/demo.py.
demo: build
	/usr/bin/python3 client/python/examples/demo.py --build $(BUILD)

clean:
	rm -rf $(BUILD)
