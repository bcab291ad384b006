#include "harness.h"

#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <numeric>
#include <utility>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "paths.h"

namespace icd::testing {

fs::path GoldenDir() { return fs::path(ICD_FIXTURES_DIR) / "golden"; }

TempDir::TempDir() {
  std::string tmpl = (fs::temp_directory_path() / "icd-it-XXXXXX").string();
  char* made = mkdtemp(tmpl.data());
  if (made == nullptr) ADD_FAILURE() << "mkdtemp failed";
  path_ = fs::canonical(tmpl);
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

absl::StatusOr<std::map<std::string, StTensor>> ReadSafetensors(
    const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError("cannot open " + file.string());
  uint64_t header_len = 0;
  unsigned char len_bytes[8];
  if (!in.read(reinterpret_cast<char*>(len_bytes), 8)) {
    return absl::DataLossError("short file " + file.string());
  }
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  const std::string body((std::istreambuf_iterator<char>(in)),
                         std::istreambuf_iterator<char>());
  const auto json = nlohmann::json::parse(header);
  std::map<std::string, StTensor> out;
  for (const auto& [name, entry] : json.items()) {
    if (name == "__metadata__") continue;
    StTensor t;
    t.dtype = entry.at("dtype").get<std::string>();
    t.shape = entry.at("shape").get<std::vector<int64_t>>();
    const auto begin = entry.at("data_offsets").at(0).get<std::size_t>();
    const auto end = entry.at("data_offsets").at(1).get<std::size_t>();
    if (end > body.size() || begin > end) {
      return absl::DataLossError("bad offsets of " + name);
    }
    const char* p = body.data() + begin;
    if (t.dtype == "F32") {
      t.f32.resize((end - begin) / 4);
      std::memcpy(t.f32.data(), p, t.f32.size() * 4);
    } else if (t.dtype == "I64") {
      t.i64.resize((end - begin) / 8);
      std::memcpy(t.i64.data(), p, t.i64.size() * 8);
    } else {
      continue;  // only what the goldens need
    }
    out.emplace(name, std::move(t));
  }
  return out;
}

Golden LoadGolden(const std::string& fixture) {
  Golden g;
  auto tensors = ReadSafetensors(GoldenDir() / fixture / "golden.safetensors");
  EXPECT_TRUE(tensors.ok()) << tensors.status();  // goldens are never skipped
  if (!tensors.ok()) return g;
  const StTensor& ids = tensors->at("input_ids");
  const StTensor& logits = tensors->at("logits");
  g.input_ids = ids.i64;
  g.batch = ids.shape.at(0);
  g.logits = logits.f32;
  g.logits_shape = logits.shape;
  return g;
}

double RelL2(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || b.empty()) {
    return std::numeric_limits<double>::infinity();
  }
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d;
    den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return std::sqrt(num) / std::sqrt(den);
}

std::vector<int64_t> RandomPermutation(const v1::Group& group,
                                       std::mt19937_64& rng) {
  const int64_t n = group.size();
  std::vector<int64_t> p(static_cast<std::size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  auto shuffle = [&](int64_t from, int64_t to) {  // [from, to)
    std::shuffle(p.begin() + from, p.begin() + to, rng);
  };
  const int64_t w = group.whole();
  const int64_t b = group.block();
  if (w > 0) {
    // Move whole chunks of w (within one block when both are set), then
    // shuffle inside each chunk.
    const int64_t span = b > 0 ? b : n;
    for (int64_t s = 0; s < n; s += span) {
      std::vector<int64_t> chunks(static_cast<std::size_t>(span / w));
      std::iota(chunks.begin(), chunks.end(), int64_t{0});
      std::shuffle(chunks.begin(), chunks.end(), rng);
      for (std::size_t k = 0; k < chunks.size(); ++k) {
        for (int64_t q = 0; q < w; ++q) {
          p[static_cast<std::size_t>(s + static_cast<int64_t>(k) * w + q)] =
              s + chunks[k] * w + q;
        }
      }
    }
    for (int64_t s = 0; s < n; s += w) shuffle(s, s + w);
  } else if (b > 0) {
    for (int64_t s = 0; s < n; s += b) shuffle(s, std::min(n, s + b));
  } else {
    shuffle(0, n);
  }
  return p;
}

std::vector<v1::Permutation> RandomPermutations(const v1::Symmetries& syms,
                                                std::mt19937_64& rng) {
  std::vector<v1::Permutation> out;
  for (const auto& g : syms.groups()) {
    v1::Permutation p;
    p.set_group(g.name());
    for (int64_t i : RandomPermutation(g, rng)) p.add_index(i);
    out.push_back(std::move(p));
  }
  return out;
}

Harness::Harness(rpc::ServiceOptions options, EngineOptions engine_options)
    : token_(options.token) {
  model_root_ = tmp_.path() / "models";
  export_root_ = tmp_.path() / "exports";
  fs::create_directories(model_root_);
  fs::create_directories(export_root_);
  for (const auto& entry : fs::directory_iterator(GoldenDir())) {
    if (!entry.is_directory()) continue;
    for (const char* layout : {"hf", "mamba_ssm"}) {
      const fs::path src = entry.path() / layout;
      if (!fs::is_directory(src)) continue;
      const fs::path dst = model_root_ / entry.path().filename() / layout;
      fs::create_directories(dst);
      fs::copy(src, dst, fs::copy_options::recursive);
    }
  }
  auto paths = rpc::PathPolicy::Create(
      {model_root_.string(), export_root_.string()}, {export_root_.string()});
  EXPECT_TRUE(paths.ok()) << paths.status();
  options.log_calls = false;
  engine_ = std::make_unique<Engine>(std::move(engine_options));
  service_ = std::make_unique<rpc::PermutationServiceImpl>(
      engine_.get(), std::move(*paths), options);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                           &port);
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  server_ = builder.BuildAndStart();
  EXPECT_NE(server_, nullptr);
  EXPECT_GT(port, 0);
  address_ = "127.0.0.1:" + std::to_string(port);
  client_ = NewClient(token_);
}

Harness::~Harness() {
  client_.reset();
  if (server_) {
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::seconds(5));
    server_->Wait();
  }
  server_.reset();
  service_.reset();
  engine_.reset();
}

std::unique_ptr<Client> Harness::NewClient(const std::string& token) const {
  ClientOptions options;
  options.token = token;
  options.deadline = std::chrono::seconds(120);
  options.max_message_mb = 64;
  auto client = Client::Connect(address_, options);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

absl::StatusOr<v1::EvaluateResponse> EvaluateGolden(Client& client,
                                                    const std::string& model,
                                                    const Golden& golden) {
  v1::EvaluateRequest request;
  request.set_model(model);
  for (int64_t id : golden.input_ids) request.add_input_ids(id);
  request.set_batch(golden.batch);
  request.set_return_logits(true);
  return client.Evaluate(request);
}

ModelState Snapshot(Client& client, const std::string& model, const Golden& golden) {
  ModelState state;
  auto list = client.ListModels();
  EXPECT_TRUE(list.ok()) << list.status();
  if (list.ok()) {
    for (const auto& m : *list) {
      if (m.name() == model) state.version = m.version();
    }
  }
  auto eval = EvaluateGolden(client, model, golden);
  EXPECT_TRUE(eval.ok()) << eval.status();
  if (eval.ok()) state.logits.assign(eval->logits().begin(), eval->logits().end());
  return state;
}

}  // namespace icd::testing
