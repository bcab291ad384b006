# icd-server for GPU nodes: CUDA runtime, LibTorch with CUDA, Ubuntu 24.04's
# gRPC 1.51 / protobuf 3.21 / abseil (the versions of Debian bookworm that the
# CI and the H200 builds use), running as a non-root user.
#
#   docker build -t icd-server .
#   docker run --gpus all -p 50051:50051 -v /srv/models:/models:ro \
#     -v /srv/exports:/exports icd-server
#
# The build stage runs deploy/build-gpu.sh, the script the H200 builds use,
# with the system's packages instead of unpacked .debs and the official
# LibTorch archive instead of PyTorch's bundled one. No GPU is needed to
# build; the GPU tests run on a GPU node (deploy/build-gpu.sh there).
# .dockerignore keeps build trees, peers' sources and results out of the
# context; .git stays, so the build records its commit.
ARG CUDA_VERSION=12.6.3
ARG LIBTORCH_URL=https://download.pytorch.org/libtorch/cu126/libtorch-cxx11-abi-shared-with-deps-2.6.0%2Bcu126.zip

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
ARG LIBTORCH_URL
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends \
      ca-certificates cmake curl g++ make unzip git python3 \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libabsl-dev nlohmann-json3-dev libgtest-dev libgmock-dev libmicrohttpd-dev \
    && rm -rf /var/lib/apt/lists/*
RUN curl -fsSL -o /tmp/libtorch.zip "${LIBTORCH_URL}" \
    && unzip -q /tmp/libtorch.zip -d /opt && rm /tmp/libtorch.zip
WORKDIR /src
COPY . .
# ICD_DEB_PREFIX=/: the packages are installed, nothing to unpack.
RUN ICD_DEBS_DIR=/nonexistent ICD_DEB_PREFIX=/ ICD_TORCH_PREFIX=/opt/libtorch \
    ICD_REQUIRE_CUDA=0 ICD_RUN_TESTS=0 ICD_BUILD_BENCH=0 ICD_BUILD_TYPE=Release \
    bash deploy/build-gpu.sh /build \
    && cmake --build /build -j"$(nproc)" --target icdctl \
    && mkdir -p /out/bin /out/lib \
    && cp /build/server/icd-server /build/client/cpp/icdctl /out/bin/ \
    && cp -P /build/server/core/libicd_core.so* /out/lib/ \
    && cp -P /opt/libtorch/lib/*.so* /out/lib/

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
ARG DEBIAN_FRONTEND=noninteractive
# Run-time halves of the build's packages (Ubuntu 24.04 names: t64 ABI).
RUN apt-get update && apt-get install -y --no-install-recommends \
      libgrpc++1.51t64 libprotobuf32t64 libabsl20220623t64 libgomp1 libmicrohttpd12t64 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/icd icd \
    && mkdir -p /models /exports && chown icd:icd /exports
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /out/lib/ /usr/local/lib/icd/
ENV LD_LIBRARY_PATH=/usr/local/lib/icd
# LibTorch exports its own copies of libstdc++'s std::filesystem functions;
# the system's must win (deploy/build-gpu.sh's notes: crashes otherwise).
ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6
USER icd
VOLUME ["/models", "/exports"]
EXPOSE 50051
# Prometheus metrics (GET /metrics, plain HTTP, no token: publish it only to
# the scraper's network).
EXPOSE 9400
# grpc.health.v1 on the serving port; needs no token.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["icdctl", "--server", "127.0.0.1:50051", "--timeout", "4", "health"]
ENTRYPOINT ["icd-server", "--listen", "0.0.0.0:50051", "--model-root", "/models", \
            "--export-root", "/exports", "--device", "cuda", "--metrics-listen", "0.0.0.0:9400"]
