# Two commands on a fresh machine: `make demo` and `make test`.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

DEB_PACKAGES := cmake g++ make pkg-config libtorch-dev libgrpc++-dev protobuf-compiler-grpc \
  libprotobuf-dev libabsl-dev googletest libgtest-dev nlohmann-json3-dev \
  python3-grpcio python3-protobuf python3-torch python3-numpy

.PHONY: deps configure build test demo clean

# Installs the Debian packages the build and the tests need (root, apt).
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

configure: deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)

build: configure
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

demo: build
	@echo "make demo: arrives with the service (see README)"

clean:
	rm -rf $(BUILD)
