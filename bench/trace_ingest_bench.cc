// Trace ingestion through the service on loopback, against a plain gRPC
// drain server; TraceStats accumulation against bare GEMMs of the same shape.
// Prints one JSON line per measurement (with the device and torch's threads).
//
//   trace_ingest_bench [--channels 1024] [--rows N] [--echo-repeat 15]
//                      [--repeat 1] [--threads T] [--seed S] [--device cpu]
//                      [--skip-icd] [--skip-engine] [--skip-accumulate]
//
// Default rows: 16 training blocks of 1024 rows at 1024 channels (17408 rows
// with the 1024 held out), the same GEMM work at other widths (at least 2
// blocks: 2560 rows at 5120). --threads sets torch's intra-op threads (0:
// torch's default); the BLAS is whatever libblas.so.3 resolves to.
// --device puts the engine's model, and so the statistics, on that device
// (cuda: the accumulation GEMMs run on the GPU; `accumulate` below stays a
// CPU measurement). Host memory is kept for reuse as icd-server keeps it
// (icd/core/host_memory.h).
//
// Setup (untimed): a synthetic Mamba-1 HF checkpoint (config.json +
// model.safetensors, random float32, one layer, hidden 256, vocab 256,
// intermediate_size = channels) in a temp dir; in this process, on
// 127.0.0.1:0 (real sockets), (a) icd::Engine + rpc::PermutationServiceImpl
// with the model loaded through LoadModel, (b) an echo/drain server that
// implements only PermutationService.ComputePermutation: it reads every
// chunk, counts rows and bytes and returns a PermutationResult with only
// `tokens` (the rows it counted) set; N rows
// of planted-cluster float32 data, generated once.
//
// Measurements (each its own JSON line):
//   echo_warmup    one call to (b) first, printed, not counted
//   echo           icd::Client::ComputePermutation (span, 1 MiB chunks) to (b)
//   icd            the same call to (a), group layers.0.inner, default
//                  solver; ingest_* excludes the server's solve_ms
//   engine_direct  the same chunks into Engine::BeginTraces/AddRows/Finish
//                  in process (no gRPC, no proto): the engine's own share
//   accumulate     traces::TraceStats Add + Finish on the training rows
//                  (rows minus the service's default holdout), the engine's
//                  options for the default statistic
//   gemm           block.t().mm(block) float64 for the same blocks, x2 (data
//                  and null): the floor accumulation is compared with
//   null_shuffle   UniformKeys + argsort + gather per block: the null's
//                  non-GEMM cost, alone
//   summary        medians (echo: also min and max) and ratios
// GB/s are 1e9 bytes of float32 payload (rows * channels * 4) per second.
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "icd/client/client.h"
#include "icd/core/engine.h"
#include "icd/core/host_memory.h"
#include "icd/v1/permutation.grpc.pb.h"
#include "paths.h"
#include "service.h"
#include "trace_ingest_accum.h"

namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int64_t kHidden = 256;
constexpr int64_t kVocab = 256;
constexpr int64_t kState = 16;
constexpr int64_t kConv = 4;
constexpr int64_t kDtRank = kHidden / 16;
constexpr int64_t kBlockRows = 1024;  // TraceStats' default internal block
constexpr int kMaxMessageMb = 64;     // icd-server's default
const char* const kGroup = "layers.0.inner";

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// User + system CPU seconds of this whole process (client, servers, torch):
// on a shared machine, wall time / CPU time says how much of a core it got.
double ProcessCpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  auto seconds = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) * 1e-6;
  };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

// splitmix64: fast, reproducible, no <random> state to carry around.
struct Rng {
  uint64_t state;
  uint64_t Next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  float Symmetric() {
    return static_cast<float>(static_cast<double>(Next() >> 11) * 0x1.0p-52 - 1.0);
  }
};

// ------------------------------------------------------------ the checkpoint

struct F32Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

F32Tensor Filled(std::vector<int64_t> shape, float value) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return {std::move(shape), std::vector<float>(static_cast<size_t>(n), value)};
}

F32Tensor Uniform(std::vector<int64_t> shape, float scale, Rng& rng) {
  F32Tensor t = Filled(std::move(shape), 0);
  for (float& v : t.data) v = scale * rng.Symmetric();
  return t;
}

void WriteSafetensors(const fs::path& file, const std::map<std::string, F32Tensor>& tensors) {
  Json header = Json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const uint64_t bytes = t.data.size() * sizeof(float);
    header[name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text += ' ';
  std::ofstream out(file, std::ios::binary);
  const uint64_t length = text.size();
  char prefix[8];
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  out.write(prefix, 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, t] : tensors) {  // same (sorted) order as the offsets
    out.write(reinterpret_cast<const char*>(t.data.data()),
              static_cast<std::streamsize>(t.data.size() * sizeof(float)));
  }
  if (!out) throw std::runtime_error("could not write " + file.string());
}

// A one-layer MambaForCausalLM (HF layout, tied head) with d_inner = channels.
void WriteCheckpoint(const fs::path& dir, int64_t channels, uint64_t seed) {
  fs::create_directories(dir);
  const Json config = {
      {"architectures", Json::array({"MambaForCausalLM"})},
      {"model_type", "mamba"},
      {"hidden_size", kHidden},
      {"intermediate_size", channels},
      {"num_hidden_layers", 1},
      {"vocab_size", kVocab},
      {"state_size", kState},
      {"conv_kernel", kConv},
      {"time_step_rank", kDtRank},
      {"expand", 2},
      {"use_bias", false},
      {"use_conv_bias", true},
      {"tie_word_embeddings", true},
      {"layer_norm_epsilon", 1e-5},
      {"residual_in_fp32", true},
      {"hidden_act", "silu"},
      {"dtype", "float32"},
  };
  std::ofstream(dir / "config.json") << config.dump(2) << "\n";

  Rng rng{seed};
  auto inv_sqrt = [](int64_t fan_in) {
    return static_cast<float>(1.0 / std::sqrt(static_cast<double>(fan_in)));
  };
  const std::string p = "backbone.layers.0.mixer.";
  std::map<std::string, F32Tensor> t;
  t["backbone.embeddings.weight"] = Uniform({kVocab, kHidden}, 0.1f, rng);
  t["backbone.layers.0.norm.weight"] = Filled({kHidden}, 1);
  t["backbone.norm_f.weight"] = Filled({kHidden}, 1);
  t[p + "in_proj.weight"] = Uniform({2 * channels, kHidden}, inv_sqrt(kHidden), rng);
  t[p + "conv1d.weight"] = Uniform({channels, 1, kConv}, inv_sqrt(kConv), rng);
  t[p + "conv1d.bias"] = Uniform({channels}, inv_sqrt(kConv), rng);
  t[p + "x_proj.weight"] = Uniform({kDtRank + 2 * kState, channels}, inv_sqrt(channels), rng);
  t[p + "dt_proj.weight"] = Uniform({channels, kDtRank}, inv_sqrt(kDtRank), rng);
  // dt = softplus(bias) near 0.01, as HF's initialisation.
  t[p + "dt_proj.bias"] = Filled({channels}, static_cast<float>(std::log(std::expm1(0.01))));
  F32Tensor a_log = Filled({channels, kState}, 0);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t s = 0; s < kState; ++s) {
      a_log.data[static_cast<size_t>(c * kState + s)] = static_cast<float>(std::log(static_cast<double>(s + 1)));
    }
  }
  t[p + "A_log"] = std::move(a_log);
  t[p + "D"] = Filled({channels}, 1);
  t[p + "out_proj.weight"] = Uniform({kHidden, channels}, inv_sqrt(channels), rng);
  WriteSafetensors(dir / "model.safetensors", t);
}

// ------------------------------------------------------------ the rows

// Planted structure, so the solve has something to find: channel c belongs
// to cluster c / 64; a row is 0.7 x its clusters' shared factor + noise.
std::vector<float> MakeRows(int64_t rows, int64_t channels, uint64_t seed) {
  std::vector<float> out(static_cast<size_t>(rows * channels));
  const int64_t clusters = (channels + 63) / 64;
  std::vector<float> factor(static_cast<size_t>(clusters));
  Rng rng{seed};
  for (int64_t r = 0; r < rows; ++r) {
    for (float& f : factor) f = rng.Symmetric();
    float* row = out.data() + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      row[c] = 0.7f * factor[static_cast<size_t>(c / 64)] + rng.Symmetric();
    }
  }
  return out;
}

// ------------------------------------------------------------ the drain server

class DrainService final : public icd::v1::PermutationService::Service {
 public:
  grpc::Status ComputePermutation(grpc::ServerContext*,
                                  grpc::ServerReader<icd::v1::TraceChunk>* reader,
                                  icd::v1::PermutationResult* response) override {
    icd::v1::TraceChunk chunk;
    int64_t rows = 0;
    uint64_t bytes = 0;
    while (reader->Read(&chunk)) {
      rows += chunk.rows();
      bytes += chunk.f32_le().size();
    }
    bytes_.store(bytes);
    response->set_tokens(rows);  // the only field set: proof every row arrived
    return grpc::Status::OK;
  }
  uint64_t last_bytes() const { return bytes_.load(); }

 private:
  std::atomic<uint64_t> bytes_{0};
};

std::unique_ptr<grpc::Server> StartServer(grpc::Service* service, std::string* address) {
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(service);
  builder.SetMaxReceiveMessageSize(kMaxMessageMb << 20);
  builder.SetMaxSendMessageSize(kMaxMessageMb << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port <= 0) throw std::runtime_error("could not start a server on 127.0.0.1:0");
  *address = "127.0.0.1:" + std::to_string(port);
  return server;
}

// ------------------------------------------------------------ reporting

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      std::string name = line.substr(colon + 1);
      name.erase(0, name.find_first_not_of(' '));
      return name;
    }
  }
  return "unknown";
}

double LoadAverage() {
  std::ifstream in("/proc/loadavg");
  double one = -1;
  in >> one;
  return one;
}

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

struct Context {
  std::string device;
  int64_t channels = 0;
  int64_t rows = 0;
  std::string cpu;
  unsigned nproc = 0;
};

Json Line(const Context& ctx, const std::string& measurement) {
  return Json{{"bench", "trace_ingest"},
              {"measurement", measurement},
              {"channels", ctx.channels},
              {"rows", ctx.rows},
              {"device", ctx.device},
              {"cpu", ctx.cpu},
              {"nproc", ctx.nproc},
              {"torch_threads", icd::bench::TorchThreads()},
              {"load_1m", LoadAverage()}};
}

void Print(const Json& line) { std::cout << line.dump() << std::endl; }

double Round(double v, int digits) {
  const double scale = std::pow(10.0, digits);
  return std::round(v * scale) / scale;
}

// One ComputePermutation call, timed: wall seconds and this process's CPU
// seconds (the client and the in-process server together). Throws on failure.
struct TimedCall {
  icd::v1::PermutationResult result;
  double seconds;
  double cpu_seconds;
};

TimedCall TimedComputePermutation(icd::Client& client, const icd::v1::TraceHeader& header,
                                  absl::Span<const float> rows) {
  const double cpu_start = ProcessCpuSeconds();
  const auto start = Clock::now();
  absl::StatusOr<icd::v1::PermutationResult> result = client.ComputePermutation(header, rows);
  const double seconds = Since(start);
  const double cpu_seconds = ProcessCpuSeconds() - cpu_start;
  if (!result.ok()) throw std::runtime_error(result.status().ToString());
  return {*std::move(result), seconds, cpu_seconds};
}

// The fields every measured ComputePermutation line has.
Json CallLine(const Context& ctx, const std::string& measurement, int rep, uint64_t bytes,
              const TimedCall& call) {
  Json line = Line(ctx, measurement);
  line["rep"] = rep;
  line["bytes"] = bytes;
  line["seconds"] = Round(call.seconds, 4);
  line["gb_per_s"] = Round(static_cast<double>(bytes) / call.seconds / 1e9, 4);
  line["cpu_seconds"] = Round(call.cpu_seconds, 4);
  return line;
}

// ------------------------------------------------------------ flags

struct Flags {
  int64_t channels = 1024;
  std::string device = "cpu";
  int64_t rows = 0;  // 0: see ParseFlags
  int echo_repeat = 15;
  int repeat = 1;
  int threads = 0;  // 0: torch's default
  uint64_t seed = 1;
  bool icd = true;
  bool engine_direct = true;
  bool accumulate = true;
};

Flags ParseFlags(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--channels") f.channels = std::stoll(value());
    else if (flag == "--rows") f.rows = std::stoll(value());
    else if (flag == "--echo-repeat") f.echo_repeat = std::stoi(value());
    else if (flag == "--repeat") f.repeat = std::stoi(value());
    else if (flag == "--threads") f.threads = std::stoi(value());
    else if (flag == "--seed") f.seed = std::stoull(value());
    else if (flag == "--device") f.device = value();
    else if (flag == "--skip-icd") f.icd = false;
    else if (flag == "--skip-engine") f.engine_direct = false;
    else if (flag == "--skip-accumulate") f.accumulate = false;
    else {
      throw std::runtime_error(
          "usage: trace_ingest_bench [--channels C] [--rows N] [--echo-repeat R] [--repeat R]"
          " [--threads T] [--seed S] [--device D] [--skip-icd] [--skip-engine]"
          " [--skip-accumulate]");
    }
  }
  if (f.channels < 2) throw std::runtime_error("--channels must be >= 2");
  if (f.rows == 0) {
    // Whole training blocks after the service's default holdout: 16 blocks
    // at 1024 channels, the same GEMM work (C^2 per row) at other widths, at
    // least 2. Sized for Debian's reference BLAS on 2 cores (a few GFLOP/s).
    const double scale = 1024.0 / static_cast<double>(f.channels);
    const auto blocks = std::max<int64_t>(2, static_cast<int64_t>(16 * scale * scale));
    const int64_t train = blocks * kBlockRows;
    f.rows = train >= 4 * 1024 ? train + 1024 : train * 5 / 4;  // holdout min(1024, rows / 5)
  }
  if (f.rows < 10) throw std::runtime_error("--rows must be >= 10");
  if (f.echo_repeat < 1 || f.repeat < 1) throw std::runtime_error("repeats must be >= 1");
  return f;
}

// ------------------------------------------------------------ main

int Run(const Flags& flags) {
  const std::string host_memory = icd::KeepFreedHostMemory();  // as icd-server does
  if (flags.threads > 0) icd::bench::SetTorchThreads(flags.threads);
  Context ctx{flags.device, flags.channels, flags.rows, CpuModel(),
              std::thread::hardware_concurrency()};
  const int64_t channels = flags.channels;
  const int64_t rows = flags.rows;
  const uint64_t bytes = static_cast<uint64_t>(rows) * static_cast<uint64_t>(channels) * 4;
  const int64_t chunk_rows = std::max<int64_t>(1, (int64_t{1} << 20) / (4 * channels));
  // The service's default holdout: the last min(1024, rows / 5) rows.
  const int64_t train_rows = rows - std::min<int64_t>(1024, rows / 5);

  // Setup, untimed.
  const fs::path tmp = fs::temp_directory_path() /
                       ("icd-ingest-" + std::to_string(::getpid()));
  fs::create_directories(tmp / "models");
  struct Cleanup {
    fs::path dir;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } cleanup{tmp};
  const fs::path model_dir = tmp / "models" / "synthetic";
  auto setup_start = Clock::now();
  WriteCheckpoint(model_dir, channels, flags.seed);
  const std::vector<float> data = MakeRows(rows, channels, flags.seed + 1);
  const double setup_seconds = Since(setup_start);

  icd::Engine engine(icd::EngineOptions{flags.device});
  absl::StatusOr<icd::rpc::PathPolicy> paths =
      icd::rpc::PathPolicy::Create({(tmp / "models").string()}, {(tmp / "models").string()});
  if (!paths.ok()) throw std::runtime_error(paths.status().ToString());
  icd::rpc::ServiceOptions service_options;
  service_options.log_calls = false;
  icd::rpc::PermutationServiceImpl icd_service(&engine, *paths, service_options);
  DrainService drain_service;
  std::string icd_address, drain_address;
  std::unique_ptr<grpc::Server> icd_server = StartServer(&icd_service, &icd_address);
  std::unique_ptr<grpc::Server> drain_server = StartServer(&drain_service, &drain_address);

  auto icd_client = icd::Client::Connect(icd_address, {});
  auto drain_client = icd::Client::Connect(drain_address, {});
  if (!icd_client.ok()) throw std::runtime_error(icd_client.status().ToString());
  if (!drain_client.ok()) throw std::runtime_error(drain_client.status().ToString());
  const auto load_start = Clock::now();
  absl::StatusOr<icd::v1::ModelInfo> info =
      (*icd_client)->LoadModel("bench", model_dir.string());
  if (!info.ok()) throw std::runtime_error(info.status().ToString());
  {
    Json line = Line(ctx, "setup");
    line["bytes"] = bytes;
    line["chunk_rows"] = chunk_rows;
    line["chunk_bytes"] = chunk_rows * channels * 4;
    line["train_rows"] = train_rows;
    line["setup_seconds"] = Round(setup_seconds, 3);
    line["load_seconds"] = Round(Since(load_start), 3);
    line["parameters"] = info->parameters();
    line["torch"] = icd::bench::TorchVersion();
    line["host_memory"] = host_memory;
    line["icd_address"] = icd_address;
    line["echo_address"] = drain_address;
    Print(line);
  }

  icd::v1::TraceHeader header;
  header.set_model("bench");
  header.set_group(kGroup);
  header.set_channels(channels);
  const absl::Span<const float> span(data);

  // (b) the drain server. One untimed call first: connections, allocator
  // and page cache warm for every measured call, icd's included.
  {
    const TimedCall warmup = TimedComputePermutation(**drain_client, header, span);
    Json line = Line(ctx, "echo_warmup");
    line["seconds"] = Round(warmup.seconds, 4);
    Print(line);
  }
  std::vector<double> echo_gbps;
  for (int rep = 0; rep < flags.echo_repeat; ++rep) {
    const TimedCall call = TimedComputePermutation(**drain_client, header, span);
    if (call.result.tokens() != rows || drain_service.last_bytes() != bytes) {
      throw std::runtime_error("echo: the drain server did not receive every row");
    }
    echo_gbps.push_back(static_cast<double>(bytes) / call.seconds / 1e9);
    Json line = CallLine(ctx, "echo", rep, bytes, call);
    line["gb_per_cpu_s"] = Round(static_cast<double>(bytes) / call.cpu_seconds / 1e9, 4);
    Print(line);
  }

  // (a) the icd service.
  std::vector<double> icd_gbps, icd_ingest_gbps, icd_solve_s;
  for (int rep = 0; flags.icd && rep < flags.repeat; ++rep) {
    const TimedCall call = TimedComputePermutation(**icd_client, header, span);
    const icd::v1::PermutationResult& result = call.result;
    const double solve_s = result.solve_ms() / 1e3;
    const double ingest_gbps = static_cast<double>(bytes) / (call.seconds - solve_s) / 1e9;
    icd_gbps.push_back(static_cast<double>(bytes) / call.seconds / 1e9);
    icd_ingest_gbps.push_back(ingest_gbps);
    icd_solve_s.push_back(solve_s);
    Json line = CallLine(ctx, "icd", rep, bytes, call);
    line["solve_ms"] = Round(result.solve_ms(), 1);
    line["ingest_seconds"] = Round(call.seconds - solve_s, 4);
    line["ingest_gb_per_s"] = Round(ingest_gbps, 4);
    line["tokens"] = result.tokens();
    line["holdout_tokens"] = result.holdout_tokens();
    line["clusters"] = result.clusters();
    line["modularity"] = Round(result.modularity(), 4);
    line["modularity_null"] = Round(result.modularity_null(), 4);
    line["structure_found"] = result.structure_found();
    Print(line);
  }

  // The engine alone: the same chunks, no gRPC, no proto.
  std::vector<double> engine_gbps;
  for (int rep = 0; flags.engine_direct && rep < flags.repeat; ++rep) {
    icd::TraceHeader engine_header;
    engine_header.model = "bench";
    engine_header.group = kGroup;
    engine_header.channels = channels;
    const double cpu_start = ProcessCpuSeconds();
    const auto start = Clock::now();
    absl::StatusOr<std::unique_ptr<icd::TraceSession>> session = engine.BeginTraces(engine_header);
    if (!session.ok()) throw std::runtime_error(session.status().ToString());
    const char* raw = reinterpret_cast<const char*>(data.data());
    for (int64_t pos = 0; pos < rows; pos += chunk_rows) {
      const int64_t n = std::min(chunk_rows, rows - pos);
      const std::string_view chunk(raw + pos * channels * 4, static_cast<size_t>(n * channels * 4));
      absl::Status added = (*session)->AddRows(chunk, n);
      if (!added.ok()) throw std::runtime_error(added.ToString());
    }
    const double add_seconds = Since(start);
    const auto finish_start = Clock::now();
    absl::StatusOr<icd::PermutationResult> result = (*session)->Finish();
    const double finish_seconds = Since(finish_start);
    if (!result.ok()) throw std::runtime_error(result.status().ToString());
    const double seconds = Since(start);
    const double cpu_seconds = ProcessCpuSeconds() - cpu_start;
    const double solve_s = result->solve_ms / 1e3;
    const double gbps = static_cast<double>(bytes) / (seconds - solve_s) / 1e9;
    engine_gbps.push_back(gbps);
    Json line = Line(ctx, "engine_direct");
    line["rep"] = rep;
    line["bytes"] = bytes;
    line["seconds"] = Round(seconds, 4);
    line["cpu_seconds"] = Round(cpu_seconds, 4);
    line["add_rows_seconds"] = Round(add_seconds, 4);
    line["finish_seconds"] = Round(finish_seconds, 4);
    line["solve_ms"] = Round(result->solve_ms, 1);
    line["ingest_seconds"] = Round(seconds - solve_s, 4);
    line["ingest_gb_per_s"] = Round(gbps, 4);
    line["tokens"] = result->tokens;
    Print(line);
  }

  // Accumulation alone against the GEMMs it is made of.
  double accumulate_s = 0, gemm_s = 0, shuffle_s = 0;
  if (flags.accumulate) {
    std::vector<double> acc, gemm, shuffle;
    for (int rep = 0; rep < flags.repeat; ++rep) {
      const double cpu_start = ProcessCpuSeconds();
      const icd::bench::AccumTiming stats = icd::bench::TimeTraceStats(
          data.data(), train_rows, channels, chunk_rows, kBlockRows, /*seed=*/0);
      const double cpu_seconds = ProcessCpuSeconds() - cpu_start;
      acc.push_back(stats.seconds);
      Json line = Line(ctx, "accumulate");
      line["rep"] = rep;
      line["stats_rows"] = stats.rows;
      line["blocks"] = stats.blocks;
      line["seconds"] = Round(stats.seconds, 4);
      line["cpu_seconds"] = Round(cpu_seconds, 4);
      line["gemm_gflop"] = Round(stats.gemm_flop / 1e9, 2);
      line["effective_gflop_per_s"] = Round(stats.gemm_flop / stats.seconds / 1e9, 2);
      line["gb_per_s"] = Round(static_cast<double>(stats.rows * channels * 4) / stats.seconds / 1e9, 4);
      line["checksum"] = stats.checksum;
      Print(line);

      const icd::bench::AccumTiming bare =
          icd::bench::TimeBareGemms(data.data(), train_rows, channels, kBlockRows);
      gemm.push_back(bare.seconds);
      line = Line(ctx, "gemm");
      line["rep"] = rep;
      line["stats_rows"] = bare.rows;
      line["blocks"] = bare.blocks;
      line["gemms"] = 2 * bare.blocks;
      line["seconds"] = Round(bare.seconds, 4);
      line["gemm_gflop"] = Round(bare.gemm_flop / 1e9, 2);
      line["gflop_per_s"] = Round(bare.gemm_flop / bare.seconds / 1e9, 2);
      Print(line);

      const icd::bench::AccumTiming null_shuffle =
          icd::bench::TimeNullShuffle(data.data(), train_rows, channels, kBlockRows, 0);
      shuffle.push_back(null_shuffle.seconds);
      line = Line(ctx, "null_shuffle");
      line["rep"] = rep;
      line["blocks"] = null_shuffle.blocks;
      line["seconds"] = Round(null_shuffle.seconds, 4);
      line["keys_seconds"] = Round(null_shuffle.keys_seconds, 4);
      line["argsort_seconds"] = Round(null_shuffle.argsort_seconds, 4);
      line["gather_seconds"] = Round(null_shuffle.gather_seconds, 4);
      Print(line);
    }
    accumulate_s = Median(acc);
    gemm_s = Median(gemm);
    shuffle_s = Median(shuffle);
  }

  Json line = Line(ctx, "summary");
  line["bytes"] = bytes;
  line["echo_gb_per_s"] = Round(Median(echo_gbps), 4);  // median of the reps
  line["echo_gb_per_s_min"] = Round(*std::min_element(echo_gbps.begin(), echo_gbps.end()), 4);
  line["echo_gb_per_s_max"] = Round(*std::max_element(echo_gbps.begin(), echo_gbps.end()), 4);
  if (!icd_gbps.empty()) {
    line["icd_gb_per_s"] = Round(Median(icd_gbps), 4);
    line["icd_ingest_gb_per_s"] = Round(Median(icd_ingest_gbps), 4);
    line["icd_over_echo"] = Round(Median(icd_gbps) / Median(echo_gbps), 4);
    line["icd_ingest_over_echo"] = Round(Median(icd_ingest_gbps) / Median(echo_gbps), 4);
    line["icd_solve_s"] = Round(Median(icd_solve_s), 3);
  }
  if (!engine_gbps.empty()) {
    line["engine_direct_ingest_gb_per_s"] = Round(Median(engine_gbps), 4);
    if (!icd_ingest_gbps.empty()) {
      line["icd_ingest_over_engine_direct"] =
          Round(Median(icd_ingest_gbps) / Median(engine_gbps), 4);
    }
  }
  if (flags.accumulate) {
    line["accumulate_seconds"] = Round(accumulate_s, 4);
    line["gemm_seconds"] = Round(gemm_s, 4);
    line["null_shuffle_seconds"] = Round(shuffle_s, 4);
    line["accumulate_over_gemm"] = Round(accumulate_s / gemm_s, 4);
  }
  Print(line);

  icd_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  drain_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  icd_server->Wait();
  drain_server->Wait();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseFlags(argc, argv));
  } catch (const std::exception& e) {
    std::cerr << "trace_ingest_bench: " << e.what() << "\n";
    return 1;
  }
}
