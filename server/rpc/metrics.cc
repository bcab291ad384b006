#include "metrics.h"

#include <unistd.h>

#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace icd::rpc {
namespace {

// A label value escaped as the exposition format wants (\\, \", \n).
std::string Escape(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

void Header(std::string& out, const char* name, const char* type, const char* help) {
  absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

std::string Number(double value) { return absl::StrFormat("%.17g", value); }

}  // namespace

void Metrics::RecordCall(std::string_view rpc, absl::StatusCode code, double seconds) {
  const std::lock_guard<std::mutex> lock(mutex_);
  ++calls_[{std::string(rpc), absl::StatusCodeToString(code)}];
  Histogram& histogram = durations_[std::string(rpc)];
  size_t bucket = 0;
  while (bucket < kBuckets.size() && seconds > kBuckets[bucket]) ++bucket;
  ++histogram.counts[bucket];
  histogram.sum += seconds;
  ++histogram.count;
}

void Metrics::RecordApply(const std::string& model, bool applied, std::optional<double> rel_l2) {
  const std::lock_guard<std::mutex> lock(mutex_);
  ++(applied ? applies_ : refused_applies_);
  if (applied && rel_l2.has_value()) verify_rel_l2_[model] = *rel_l2;
}

void Metrics::RecordVerify(const std::string& model, double rel_l2) {
  const std::lock_guard<std::mutex> lock(mutex_);
  verify_rel_l2_[model] = rel_l2;
}

void Metrics::ForgetModel(const std::string& model) {
  const std::lock_guard<std::mutex> lock(mutex_);
  verify_rel_l2_.erase(model);
}

void Metrics::AddTraceBytes(int64_t bytes) {
  const std::lock_guard<std::mutex> lock(mutex_);
  trace_bytes_ += static_cast<uint64_t>(bytes > 0 ? bytes : 0);
}

std::string Metrics::Render(const std::vector<ModelInfo>& models,
                            const std::vector<DeviceMemory>& devices) const {
  std::string out;
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    Header(out, "icd_requests_total", "counter", "Finished calls by RPC and status code.");
    for (const auto& [key, count] : calls_) {
      absl::StrAppend(&out, "icd_requests_total{rpc=\"", Escape(key.first), "\",code=\"",
                      Escape(key.second), "\"} ", count, "\n");
    }
    Header(out, "icd_request_duration_seconds", "histogram",
           "Time from a call's arrival to its status, by RPC.");
    for (const auto& [rpc, histogram] : durations_) {
      const std::string label = Escape(rpc);
      uint64_t cumulative = 0;
      for (size_t b = 0; b <= kBuckets.size(); ++b) {
        cumulative += histogram.counts[b];
        absl::StrAppend(&out, "icd_request_duration_seconds_bucket{rpc=\"", label, "\",le=\"",
                        b < kBuckets.size() ? Number(kBuckets[b]) : "+Inf", "\"} ", cumulative,
                        "\n");
      }
      absl::StrAppend(&out, "icd_request_duration_seconds_sum{rpc=\"", label, "\"} ",
                      Number(histogram.sum), "\n");
      absl::StrAppend(&out, "icd_request_duration_seconds_count{rpc=\"", label, "\"} ",
                      histogram.count, "\n");
    }
    Header(out, "icd_applies_total", "counter",
           "ApplyPermutation calls by result: applied (the model changed and verified, unless "
           "skip_verify) or refused (the model left as it was).");
    absl::StrAppend(&out, "icd_applies_total{result=\"applied\"} ", applies_, "\n");
    absl::StrAppend(&out, "icd_applies_total{result=\"refused\"} ", refused_applies_, "\n");
    Header(out, "icd_verify_rel_l2", "gauge",
           "The last verification's relative L2 distance of the logits, by model.");
    for (const auto& [model, rel_l2] : verify_rel_l2_) {
      absl::StrAppend(&out, "icd_verify_rel_l2{model=\"", Escape(model), "\"} ", Number(rel_l2),
                      "\n");
    }
    Header(out, "icd_trace_bytes_total", "counter",
           "Activation trace bytes received by ComputePermutation streams.");
    absl::StrAppend(&out, "icd_trace_bytes_total ", trace_bytes_, "\n");
  }
  Header(out, "icd_models_loaded", "gauge", "Models loaded.");
  absl::StrAppend(&out, "icd_models_loaded ", models.size(), "\n");
  Header(out, "icd_model_bytes", "gauge",
         "Bytes a loaded model holds on its device as the memory budget counts them (its "
         "weights in its dtype and its probe reference), by model, device and dtype.");
  for (const ModelInfo& model : models) {
    const std::string dtype(DTypeName(model.dtype));
    // A model placed over several devices: a series per device, its share.
    std::map<std::string, int64_t> by_device;
    if (model.placement.size() > 1) {
      for (const LayerRange& range : model.placement) by_device[range.device] += range.bytes;
    } else {
      by_device[model.device] = model.device_bytes;
    }
    for (const auto& [device, bytes] : by_device) {
      absl::StrAppend(&out, "icd_model_bytes{model=\"", Escape(model.name), "\",device=\"",
                      Escape(device), "\",dtype=\"", dtype, "\"} ", bytes, "\n");
    }
  }
  Header(out, "icd_device_memory_bytes", "gauge",
         "Bytes the memory budget counts on a device, by what holds them: loaded models, or "
         "running calls' estimates.");
  for (const DeviceMemory& device : devices) {
    const std::string label = Escape(device.device);
    absl::StrAppend(&out, "icd_device_memory_bytes{device=\"", label, "\",held_by=\"models\"} ",
                    device.model_bytes, "\n");
    absl::StrAppend(&out, "icd_device_memory_bytes{device=\"", label, "\",held_by=\"calls\"} ",
                    device.call_bytes, "\n");
  }
  Header(out, "icd_device_memory_budget_bytes", "gauge",
         "A device's memory budget (icd-server --memory-budget-mb); devices without one are "
         "left out.");
  for (const DeviceMemory& device : devices) {
    if (device.budget_bytes <= 0) continue;
    absl::StrAppend(&out, "icd_device_memory_budget_bytes{device=\"", Escape(device.device),
                    "\"} ", device.budget_bytes, "\n");
  }
  Header(out, "icd_cuda_allocator_bytes", "gauge",
         "LibTorch's CUDA caching allocator on a device: bytes in live tensors (allocated) "
         "and bytes held from the driver (reserved); CUDA devices only.");
  for (const DeviceMemory& device : devices) {
    if (device.allocator_reserved_bytes < 0) continue;
    const std::string label = Escape(device.device);
    absl::StrAppend(&out, "icd_cuda_allocator_bytes{device=\"", label, "\",kind=\"allocated\"} ",
                    device.allocator_allocated_bytes, "\n");
    absl::StrAppend(&out, "icd_cuda_allocator_bytes{device=\"", label, "\",kind=\"reserved\"} ",
                    device.allocator_reserved_bytes, "\n");
  }
  Header(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
  absl::StrAppend(&out, "process_resident_memory_bytes ", ResidentBytes(), "\n");
  return out;
}

int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size_pages = 0;
  int64_t resident_pages = 0;
  if (!(statm >> size_pages >> resident_pages)) return 0;
  return resident_pages * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace icd::rpc
