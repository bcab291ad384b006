#!/usr/bin/env bash
# Trace-ingestion benchmark: ComputePermutation through the real service on
# loopback against a plain gRPC drain server (same proto, same client), and
# TraceStats accumulation against bare float64 GEMMs (bench/trace_ingest_bench).
#
#   bench/ingest_bench.sh BUILD_DIR OUT_FILE [RUN...]
#
# Each RUN is one quoted string: "CHANNELS [FLAGS...]" (flags of
# trace_ingest_bench, e.g. "5120 --skip-engine"). Default: "1024" "5120".
# Env: ICD_INGEST_APPEND=1 appends to OUT_FILE instead of replacing it. The
# provenance names what the environment changes (LD_LIBRARY_PATH,
# GLIBC_TUNABLES, OMP_NUM_THREADS, OPENBLAS_*) and the libblas.so.3 the binary
# resolves, and each run is framed by the load and the busiest processes
# before and after it (the machine may be shared). One JSON line per
# measurement.
set -euo pipefail
build=${1:?build dir}
out=${2:?output file}
shift 2
runs=("$@")
[[ $# -eq 0 ]] && runs=("1024" "5120")
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$build/bench/trace_ingest_bench"
[[ -x $bin ]] || { echo "no $bin: cmake --build $build --target trace_ingest_bench" >&2; exit 2; }

busiest() {
  echo "load $(cut -d' ' -f1-3 /proc/loadavg); busiest: $(ps -eo pcpu,comm --sort=-pcpu --no-headers |
    head -5 | awk '{printf "%s %s%%, ", $2, $1}')"
}

[[ ${ICD_INGEST_APPEND:-0} == 1 ]] || : > "$out"
{
  echo "# icd trace-ingestion benchmark (bench/trace_ingest_bench via bench/ingest_bench.sh)"
  echo "# commit: $(git -C "$here" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$here" diff --quiet 2>/dev/null || echo ' (working tree modified)')"
  echo "# date: $(date -u +%FT%TZ)"
  echo "# uname -a: $(uname -a)"
  echo "# cpu: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(free -g | awk '/Mem:/{print $2 " GiB"}')"
  echo "# command: bench/ingest_bench.sh $build $out$(printf ' "%s"' "${runs[@]}")"
  echo "# env: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} GLIBC_TUNABLES=${GLIBC_TUNABLES:-} OMP_NUM_THREADS=${OMP_NUM_THREADS:-} $(env | grep '^OPENBLAS_' | sort | tr '\n' ' ')"
  echo "# blas: $(ldd "$bin" | awk '/libblas.so.3/{print $3}') -> $(readlink -f "$(ldd "$bin" | awk '/libblas.so.3/{print $3}')")"
} >> "$out"

for run in "${runs[@]}"; do
  read -r -a words <<< "$run"
  {
    echo "# run: $bin --channels ${words[*]}"
    echo "# before: $(busiest)"
  } >> "$out"
  "$bin" --channels "${words[@]}" | tee -a "$out"
  echo "# after: $(busiest)" >> "$out"
done
