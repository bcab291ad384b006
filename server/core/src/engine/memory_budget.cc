// The memory budget's text form (icd/core/memory_budget.h), the ledger that
// holds devices to it, and the estimates of what models and calls hold
// (engine/memory_budget.h).
#include "engine/memory_budget.h"

#include <algorithm>
#include <limits>
#include <utility>

#ifdef ICD_HAVE_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/version.h>
#include <cuda_runtime_api.h>
#include <torch/cuda.h>
#endif

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "blocks/shapes.h"
#include "forward/probe.h"
#include "io/config.h"

namespace icd {

namespace {

constexpr int64_t kMaxBudgetMiB = int64_t{1} << 30;  // 1 PiB

// "cpu", "cuda" or "cuda:I" (I decimal, no sign, at most 4 digits).
bool IsBudgetDevice(absl::string_view device) {
  if (device == "cpu" || device == "cuda") return true;
  if (!absl::ConsumePrefix(&device, "cuda:")) return false;
  if (device.empty() || device.size() > 4) return false;
  return std::all_of(device.begin(), device.end(),
                     [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); });
}

std::string BudgetKeyName(const std::string& key) {
  return key.empty() ? "every other device" : key;
}

}  // namespace

int64_t MemoryBudget::For(absl::string_view device) const {
  auto it = bytes.find(std::string(device));
  if (it == bytes.end() && absl::StartsWith(device, "cuda")) it = bytes.find("cuda");
  if (it == bytes.end()) it = bytes.find("");
  return it == bytes.end() ? 0 : it->second;
}

int64_t MemoryBudget::Bound() const {
  const bool every_device =
      bytes.count("") > 0 || (bytes.count("cpu") > 0 && bytes.count("cuda") > 0);
  if (!every_device) return 0;
  int64_t largest = 0;
  for (const auto& [key, value] : bytes) largest = std::max(largest, value);
  return largest;
}

absl::Status AddMemoryBudget(absl::string_view spec, MemoryBudget& budget) {
  MemoryBudget added = budget;
  for (absl::string_view entry : absl::StrSplit(spec, ',')) {
    entry = absl::StripAsciiWhitespace(entry);
    std::string device;
    absl::string_view number = entry;
    if (const size_t eq = entry.find('='); eq != absl::string_view::npos) {
      device = std::string(absl::StripAsciiWhitespace(entry.substr(0, eq)));
      number = absl::StripAsciiWhitespace(entry.substr(eq + 1));
      if (!IsBudgetDevice(device)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "'", entry, "': the device must be cpu, cuda (every CUDA device not named) or cuda:N"));
      }
    }
    int64_t mib = 0;
    if (entry.empty() || number.empty() ||
        !absl::ascii_isdigit(static_cast<unsigned char>(number[0])) ||
        !absl::SimpleAtoi(number, &mib) || mib < 1 || mib > kMaxBudgetMiB) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", entry, "': expected N or DEVICE=N, N a whole number of MiB in 1..",
                       kMaxBudgetMiB, " (e.g. 70000, or cuda:0=70000,cpu=4000)"));
    }
    if (!added.bytes.emplace(device, mib << 20).second) {
      return absl::InvalidArgumentError(
          device.empty() ? absl::StrCat("'", entry, "': a budget for every device is given twice")
                         : absl::StrCat("'", entry, "': device ", device, " is given twice"));
    }
  }
  budget = std::move(added);
  return absl::OkStatus();
}

std::string DescribeMemoryBudget(const MemoryBudget& budget) {
  if (budget.empty()) return "no limit";
  std::vector<std::string> parts;
  for (const auto& [key, value] : budget.bytes) {
    if (!key.empty()) parts.push_back(absl::StrCat(key, " ", value >> 20, " MiB"));
  }
  if (budget.bytes.count("") > 0) {
    parts.push_back(absl::StrCat(BudgetKeyName(""), " ", budget.bytes.at("") >> 20, " MiB"));
  }
  return absl::StrJoin(parts, ", ");
}

namespace engine_internal {

// ---------------------------------------------------------------- ledger

MemoryHold::MemoryHold(MemoryHold&& other) noexcept
    : ledger_(std::exchange(other.ledger_, nullptr)),
      device_(std::move(other.device_)),
      bytes_(std::exchange(other.bytes_, 0)) {}

MemoryHold& MemoryHold::operator=(MemoryHold&& other) noexcept {
  if (this != &other) {
    Release();
    ledger_ = std::exchange(other.ledger_, nullptr);
    device_ = std::move(other.device_);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

MemoryHold::~MemoryHold() { Release(); }

void MemoryHold::Release() {
  if (ledger_ != nullptr) ledger_->ReleaseCall(device_, bytes_);
  ledger_ = nullptr;
  bytes_ = 0;
}

absl::Status MemoryLedger::Fits(const std::string& device, int64_t bytes, absl::string_view what,
                                absl::string_view hint, int64_t excluded) const {
  const int64_t budget = budget_.For(device);
  if (budget <= 0) return absl::OkStatus();
  Usage usage;
  if (auto it = devices_.find(device); it != devices_.end()) usage = it->second;
  const int64_t in_use = usage.model_bytes - excluded + usage.call_bytes;
  if (bytes <= budget - in_use) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      absl::StrCat("memory budget of device ", device, ": ", what, " needs ", BytesText(bytes),
                   "; ", BytesText(in_use), " are in use there (", usage.models,
                   " model(s): ", BytesText(usage.model_bytes - excluded), ", ", usage.calls,
                   " running call(s): ", BytesText(usage.call_bytes), "), the budget is ",
                   BytesText(budget), " (icd-server --memory-budget-mb); ", hint));
}

absl::Status MemoryLedger::CheckFits(const std::string& device, int64_t bytes,
                                     absl::string_view what, absl::string_view hint) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return Fits(device, bytes, what, hint, 0);
}

absl::Status MemoryLedger::BookModel(const std::string& name, const std::string& device,
                                     int64_t bytes, absl::string_view what,
                                     absl::string_view hint) {
  return BookModel(name, std::map<std::string, int64_t>{{device, bytes}}, what, hint);
}

absl::Status MemoryLedger::BookModel(const std::string& name,
                                     const std::map<std::string, int64_t>& parts,
                                     absl::string_view what, absl::string_view hint) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto previous = models_.find(name);
  // Every device first: a refusal on one books nothing on any.
  for (const auto& [device, bytes] : parts) {
    int64_t excluded = 0;
    if (previous != models_.end()) {
      if (auto it = previous->second.find(device); it != previous->second.end()) {
        excluded = it->second;
      }
    }
    if (absl::Status fits = Fits(device, bytes, what, hint, excluded); !fits.ok()) return fits;
  }
  if (previous != models_.end()) Unbook(previous->second);
  for (const auto& [device, bytes] : parts) {
    Usage& usage = devices_[device];
    usage.model_bytes += bytes;
    usage.models += 1;
  }
  models_[name] = parts;
  return absl::OkStatus();
}

void MemoryLedger::Unbook(const std::map<std::string, int64_t>& parts) {
  for (const auto& [device, bytes] : parts) {
    Usage& usage = devices_[device];
    usage.model_bytes -= bytes;
    usage.models -= 1;
  }
}

void MemoryLedger::ReleaseModel(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = models_.find(name);
  if (it == models_.end()) return;
  Unbook(it->second);
  models_.erase(it);
}

absl::StatusOr<MemoryHold> MemoryLedger::BookCall(const std::string& device, int64_t bytes,
                                                  absl::string_view what, absl::string_view hint) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (absl::Status fits = Fits(device, bytes, what, hint, 0); !fits.ok()) return fits;
  Usage& usage = devices_[device];
  usage.call_bytes += bytes;
  usage.calls += 1;
  MemoryHold hold;
  hold.ledger_ = this;
  hold.device_ = device;
  hold.bytes_ = bytes;
  return hold;
}

void MemoryLedger::ReleaseCall(const std::string& device, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  Usage& usage = devices_[device];
  usage.call_bytes -= bytes;
  usage.calls -= 1;
}

namespace {

// The CUDA caching allocator's figures for each CUDA device in `out` (those
// with a budget, models or calls: LibTorch has initialised their allocator
// once a model lives there); nothing in a build without CUDA. A device whose
// allocator cannot say keeps -1.
void AddAllocatorBytes(std::map<std::string, DeviceMemory>& out) {
#ifdef ICD_HAVE_CUDA
  const int64_t count = static_cast<int64_t>(torch::cuda::device_count());
  for (auto& [name, memory] : out) {
    int64_t index = -1;
    if (!absl::StartsWith(name, "cuda:") || !absl::SimpleAtoi(name.substr(5), &index) ||
        index < 0 || index >= count) {
      continue;
    }
    try {
      // Index 0 of each statistic is the aggregate over pool kinds.
      const auto stats =
          c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index));
      memory.allocator_allocated_bytes = stats.allocated_bytes[0].current;
      memory.allocator_reserved_bytes = stats.reserved_bytes[0].current;
    } catch (const c10::Error&) {
      // Not initialised yet (nothing allocated there): no figures.
    }
  }
#else
  (void)out;
#endif
}

}  // namespace

int64_t MemoryLedger::Unbooked(const std::string& device) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t budget = budget_.For(device);
  if (budget <= 0) return -1;
  auto it = devices_.find(device);
  if (it == devices_.end()) return budget;
  return budget - it->second.model_bytes - it->second.call_bytes;
}

bool MemoryLedger::NoCalls() const {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& [device, usage] : devices_) {
    if (usage.calls > 0) return false;
  }
  return true;
}

int64_t FreeDeviceBytes(const torch::Device& device) {
#ifdef ICD_HAVE_CUDA
  if (!device.is_cuda()) return -1;
  try {
    const c10::cuda::CUDAGuard guard(device);
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return -1;
    int64_t cached = 0;  // held by LibTorch's allocator, not in a tensor
    try {
      const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
      cached = stats.reserved_bytes[0].current - stats.allocated_bytes[0].current;
    } catch (const c10::Error&) {
    }
    return static_cast<int64_t>(free) + cached;
  } catch (const std::exception&) {
    return -1;
  }
#else
  (void)device;
  return -1;
#endif
}

void ReleaseCublasWorkspaces() {
#if defined(ICD_HAVE_CUDA) && TORCH_VERSION_MAJOR >= 2
  at::cuda::clearCublasWorkspaces();
#endif
}

std::vector<DeviceMemory> MemoryLedger::Snapshot() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::map<std::string, DeviceMemory> out;
  for (const auto& [key, bytes] : budget_.bytes) {
    // "cuda" and "" name no one device: they show on the devices they cover.
    if (key == "cpu" || absl::StartsWith(key, "cuda:")) out[key].device = key;
  }
  for (const auto& [device, usage] : devices_) {
    DeviceMemory& memory = out[device];
    memory.device = device;
    memory.model_bytes = usage.model_bytes;
    memory.call_bytes = usage.call_bytes;
    memory.models = usage.models;
    memory.calls = usage.calls;
  }
  AddAllocatorBytes(out);
  std::vector<DeviceMemory> devices;
  for (auto& [device, memory] : out) {
    memory.budget_bytes = budget_.For(device);
    devices.push_back(std::move(memory));
  }
  return devices;
}

std::string MemoryDevice(const torch::Device& device) {
  if (device.is_cuda() && !device.has_index()) {
    // An empty tensor allocates nothing, and says where LibTorch would.
    return torch::empty({0}, torch::TensorOptions().device(device)).device().str();
  }
  return device.str();
}

std::string BytesText(int64_t bytes) {
  return absl::StrFormat("%d bytes (%.1f MiB)", bytes, static_cast<double>(bytes) / (1 << 20));
}

int64_t SaturatingProduct(std::initializer_list<int64_t> factors) {
  int64_t product = 1;
  for (const int64_t factor : factors) {
    if (__builtin_mul_overflow(product, std::max<int64_t>(factor, 0), &product)) {
      return std::numeric_limits<int64_t>::max();
    }
  }
  return product;
}

int64_t SaturatingSum(std::initializer_list<int64_t> terms) {
  int64_t sum = 0;
  for (const int64_t term : terms) {
    if (__builtin_add_overflow(sum, std::max<int64_t>(term, 0), &sum)) {
      return std::numeric_limits<int64_t>::max();
    }
  }
  return sum;
}

// ---------------------------------------------------------------- estimates

namespace {

int64_t ElementBytes(torch::ScalarType dtype) {
  return static_cast<int64_t>(c10::elementSize(dtype));
}

// max(float32, dtype): the residual stream, norms and scan state.
int64_t AccumulateBytes(torch::ScalarType dtype) {
  return std::max<int64_t>(4, ElementBytes(dtype));
}

}  // namespace

int64_t WeightElements(const ModelConfig& config) {
  int64_t elements = 0;
  for (const auto& [name, shape] : ExpectedShapes(config)) {
    int64_t numel = 1;
    for (const int64_t size : shape) numel = SaturatingProduct({numel, size});
    elements = SaturatingSum({elements, numel});
  }
  return elements;
}

int64_t ProbeBytes(const ModelConfig& config) {
  return SaturatingSum({SaturatingProduct({kProbeBatch, kProbeSeq, 8}),
                        SaturatingProduct({kProbeBatch, kProbeSeq, config.vocab_size, 4})});
}

int64_t ModelBytes(const ModelConfig& config, torch::ScalarType dtype) {
  return SaturatingSum(
      {SaturatingProduct({WeightElements(config), ElementBytes(dtype)}), ProbeBytes(config)});
}

int64_t ForwardBytes(const ModelConfig& config, torch::ScalarType dtype, int64_t batch,
                     int64_t seq) {
  // The widest in_proj (its output is a layer's largest activation), from
  // the first layer of each kind of mixer.
  int64_t in_rows = 0;
  std::vector<MixerType> seen;
  for (int64_t layer = 0; layer < static_cast<int64_t>(config.mixers.size()); ++layer) {
    const MixerType type = config.mixers[static_cast<size_t>(layer)];
    if (std::find(seen.begin(), seen.end(), type) != seen.end()) continue;
    seen.push_back(type);
    blocks::TensorShapes shapes;
    blocks::ShapesAt(config, layer).tensors(config, layer, shapes);
    auto it = shapes.find(LayerTensorName(layer, "mixer.in_proj.weight"));
    if (it != shapes.end() && !it->second.empty()) in_rows = std::max(in_rows, it->second[0]);
  }
  const int64_t positions = SaturatingProduct({batch, seq});
  // A gated MLP after the mixer (d_intermediate) adds fc1's output and the
  // product it feeds fc2, 3 x d_intermediate a position.
  const int64_t per_position =
      SaturatingSum({SaturatingProduct({2, in_rows}), SaturatingProduct({3, config.d_inner}),
                     SaturatingProduct({4, config.d_model}),
                     SaturatingProduct({3, config.d_intermediate}),
                     config.mlp_layers.empty() ? 0 : SaturatingProduct({3, config.mlp.hidden}),
                     // experts: the hidden width of those a position visits, and the shared one
                     SaturatingProduct({3, config.moe.top_k, config.moe.hidden}),
                     SaturatingProduct({3, config.moe.shared_hidden}),
                     // separate q, k, v projections: their outputs, then concatenated
                     !blocks::Attends(config)
                         ? 0
                         : SaturatingProduct({2, config.attention.qkv_rows()})});
  const int64_t activations = SaturatingProduct({positions, per_position, AccumulateBytes(dtype)});
  // Attention: its scores, their masked copy, the softmax and its cast, wide,
  // [B, heads, L, L] each (4 counted), and the keys and values repeated for
  // every query head, wide (4 x [B, heads, L, head_dim]).
  const AttentionConfig& a = config.attention;
  const int64_t attention =
      !blocks::Attends(config)
          ? 0
          : SaturatingSum({SaturatingProduct({4, batch, a.heads, seq, seq, AccumulateBytes(dtype)}),
                           SaturatingProduct({4, batch, a.heads, seq, a.head_dim,
                                              AccumulateBytes(dtype)})});
  const int64_t logit_bytes = 4 + (dtype == torch::kFloat32 ? 0 : ElementBytes(dtype));
  const int64_t logits = SaturatingProduct({positions, config.vocab_size, logit_bytes});
  return SaturatingSum({activations, attention, logits, SaturatingProduct({positions, 8})});  // + the ids
}

int64_t StateBytes(const ModelConfig& config, torch::ScalarType dtype, int64_t batch,
                   int64_t positions) {
  auto bytes_of = [positions](const std::vector<int64_t>& shape, int64_t element) {
    if (shape.empty()) return int64_t{0};
    int64_t bytes = element;
    for (const int64_t size : shape) {
      bytes = SaturatingProduct({bytes, size == blocks::kAnyLength ? positions : size});
    }
    return bytes;
  };
  int64_t bytes = 0;
  for (int64_t layer = 0; layer < config.n_layer; ++layer) {
    blocks::StateShapes shapes = blocks::ShapesAt(config, layer).state_shapes(config, batch);
    if (blocks::AttentionBeside(config, layer)) {
      shapes.attention_cache = blocks::kAttentionShapes.state_shapes(config, batch).attention_cache;
    }
    bytes = SaturatingSum({bytes, bytes_of(shapes.conv_history, ElementBytes(dtype)),
                           bytes_of(shapes.ssm_state, AccumulateBytes(dtype)),
                           SaturatingProduct({2, bytes_of(shapes.attention_cache,
                                                          ElementBytes(dtype))})});
  }
  return bytes;
}

int64_t StatsBytes(int64_t channels, int64_t rows) {
  return SaturatingSum({SaturatingProduct({2, channels, channels, 8}),
                        SaturatingProduct({2, std::min<int64_t>(rows, 1024), channels, 8})});
}

int64_t SolverBytes(int64_t channels) { return SaturatingProduct({4, channels, channels, 8}); }

}  // namespace engine_internal
}  // namespace icd
