#include "counters/hardware_counters.h"

#include <algorithm>
#include <iterator>
#include <map>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "icd/core/status_macros.h"

#ifdef ICD_HAVE_CUPTI
#include <cuda.h>
#include <cupti_callbacks.h>
#include <cupti_driver_cbid.h>
#include <cupti_runtime_cbid.h>
#include <cupti_profiler_host.h>
#include <cupti_profiler_target.h>
#include <cupti_range_profiler.h>
#include <cupti_result.h>
#include <cupti_target.h>
#include <cxxabi.h>
#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#endif

namespace icd::counters {

void Add(KernelCounters& sum, const KernelCounters& launch) {
  const double sectors = sum.l2_sectors + launch.l2_sectors;
  sum.l2_hit_rate =
      sectors > 0 ? (sum.l2_hit_rate * sum.l2_sectors + launch.l2_hit_rate * launch.l2_sectors) /
                        sectors
                  : 0;
  sum.launches += launch.launches;
  sum.dram_read_bytes += launch.dram_read_bytes;
  sum.dram_write_bytes += launch.dram_write_bytes;
  sum.l2_sectors = sectors;
  sum.duration_ns += launch.duration_ns;
}

const std::vector<std::string>& MetricNames() {
  static const std::vector<std::string> names = {
      "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sectors.sum",
      "lts__t_sector_hit_rate.pct", "gpu__time_duration.sum"};
  return names;
}

std::vector<KernelCounters> ByKernel(const std::vector<KernelCounters>& launches) {
  std::vector<KernelCounters> kernels;
  std::map<std::string, size_t> index;
  for (const KernelCounters& launch : launches) {
    auto [it, inserted] = index.emplace(launch.kernel, kernels.size());
    if (inserted) {
      kernels.push_back(KernelCounters{launch.kernel});
    }
    Add(kernels[it->second], launch);
  }
  return kernels;
}

KernelCounters Total(const std::vector<KernelCounters>& launches) {
  KernelCounters total{"total"};
  for (const KernelCounters& launch : launches) Add(total, launch);
  return total;
}

std::string Describe(Replay replay) {
  switch (replay) {
    case Replay::kUser:
      return "CUPTI range profiler: a range per kernel launch, the work rerun once per pass "
             "(user replay): each kernel sees the caches as the kernels before it left them";
    case Replay::kKernel:
      return "CUPTI range profiler: a range per kernel launch, each kernel replayed with device "
             "memory restored until every counter is read (kernel replay: DRAM writes include "
             "the write-back of the restore)";
  }
  return "";
}

absl::StatusOr<std::vector<KernelCounters>> Collect(int device_index,
                                                  const std::function<absl::Status()>& work,
                                                  Replay replay,
                                                  const std::function<absl::Status()>& rewind,
                                                  int64_t max_launches,
                                                  const std::function<absl::Status()>& flush) {
  ICD_ASSIGN_OR_RETURN(std::vector<std::vector<KernelCounters>> pieces,
                       CollectEach(device_index, {work}, replay, rewind, max_launches, flush));
  return std::move(pieces.front());
}

#ifndef ICD_HAVE_CUPTI

constexpr char kBuiltWithoutCupti[] =
    "hardware counters: this server was built without CUPTI (CUDA's profiling interface; "
    "its headers come with the CUDA toolkit the server is built with)";

absl::StatusOr<std::vector<std::vector<KernelCounters>>> CollectEach(
    int, const std::vector<std::function<absl::Status()>>&, Replay,
    const std::function<absl::Status()>&, int64_t, const std::function<absl::Status()>&) {
  return absl::FailedPreconditionError(kBuiltWithoutCupti);
}

absl::StatusOr<std::optional<int64_t>> CountLaunches(const std::function<absl::Status()>&) {
  return absl::FailedPreconditionError(kBuiltWithoutCupti);
}

#else  // ICD_HAVE_CUPTI

namespace {

// libcupti's entry points and the two of the driver it needs, resolved once.
struct Api {
  std::string error;  // why they could not be resolved; empty when they were
  std::string library;
  decltype(&cuptiGetResultString) GetResultString = nullptr;
  decltype(&cuptiProfilerInitialize) ProfilerInitialize = nullptr;
  decltype(&cuptiProfilerDeInitialize) ProfilerDeInitialize = nullptr;
  decltype(&cuptiSubscribe) Subscribe = nullptr;
  decltype(&cuptiUnsubscribe) Unsubscribe = nullptr;
  decltype(&cuptiEnableDomain) EnableDomain = nullptr;
  decltype(&cuptiDeviceGetChipName) DeviceGetChipName = nullptr;
  decltype(&cuptiProfilerGetCounterAvailability) GetCounterAvailability = nullptr;
  decltype(&cuptiProfilerHostInitialize) HostInitialize = nullptr;
  decltype(&cuptiProfilerHostDeinitialize) HostDeinitialize = nullptr;
  decltype(&cuptiProfilerHostConfigAddMetrics) HostConfigAddMetrics = nullptr;
  decltype(&cuptiProfilerHostGetConfigImageSize) HostGetConfigImageSize = nullptr;
  decltype(&cuptiProfilerHostGetConfigImage) HostGetConfigImage = nullptr;
  decltype(&cuptiProfilerHostGetRangeName) HostGetRangeName = nullptr;
  decltype(&cuptiProfilerHostEvaluateToGpuValues) HostEvaluateToGpuValues = nullptr;
  decltype(&cuptiRangeProfilerEnable) RangeEnable = nullptr;
  decltype(&cuptiRangeProfilerDisable) RangeDisable = nullptr;
  decltype(&cuptiRangeProfilerGetCounterDataSize) RangeGetCounterDataSize = nullptr;
  decltype(&cuptiRangeProfilerCounterDataImageInitialize) RangeCounterDataImageInitialize = nullptr;
  decltype(&cuptiRangeProfilerSetConfig) RangeSetConfig = nullptr;
  decltype(&cuptiRangeProfilerStart) RangeStart = nullptr;
  decltype(&cuptiRangeProfilerStop) RangeStop = nullptr;
  decltype(&cuptiRangeProfilerDecodeData) RangeDecodeData = nullptr;
  decltype(&cuptiRangeProfilerGetCounterDataInfo) RangeGetCounterDataInfo = nullptr;
  decltype(&cuCtxGetCurrent) CtxGetCurrent = nullptr;
  decltype(&cuCtxSynchronize) CtxSynchronize = nullptr;
};

// Where libcupti may be: ICD_CUPTI_LIBRARY; the loader's paths; beside the
// CUDA runtime this process loaded (PyTorch's wheels keep both in one
// folder); the CUDA toolkit's folders.
std::vector<std::string> CuptiCandidates() {
  const std::string name = absl::StrCat("libcupti.so.", CUDA_VERSION / 1000);
  std::vector<std::string> candidates;
  if (const char* forced = std::getenv("ICD_CUPTI_LIBRARY"); forced != nullptr && *forced) {
    candidates.push_back(forced);
    return candidates;
  }
  candidates.push_back(name);
  candidates.push_back("libcupti.so");
  void* runtime = dlsym(RTLD_DEFAULT, "cudaRuntimeGetVersion");
  Dl_info info{};
  if (runtime != nullptr && dladdr(runtime, &info) != 0 && info.dli_fname != nullptr) {
    candidates.push_back(
        (std::filesystem::path(info.dli_fname).parent_path() / name).string());
  }
  const char* home = std::getenv("CUDA_HOME");
  for (const std::string& root : {std::string(home != nullptr ? home : ""),
                                 std::string("/usr/local/cuda")}) {
    if (root.empty()) continue;
    for (const char* folder : {"extras/CUPTI/lib64", "lib64", "targets/x86_64-linux/lib"}) {
      candidates.push_back((std::filesystem::path(root) / folder / name).string());
    }
  }
  return candidates;
}

Api Open() {
  Api api;
  void* cupti = nullptr;
  std::string tried;
  for (const std::string& candidate : CuptiCandidates()) {
    cupti = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (cupti != nullptr) {
      api.library = candidate;
      break;
    }
    absl::StrAppend(&tried, tried.empty() ? "" : ", ", candidate);
  }
  if (cupti == nullptr) {
    api.error = absl::StrCat("libcupti could not be opened (tried ", tried,
                             "; set ICD_CUPTI_LIBRARY to its path)");
    return api;
  }
  void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (driver == nullptr) driver = dlopen("libcuda.so.1", RTLD_NOW);
  if (driver == nullptr) {
    api.error = "the CUDA driver (libcuda.so.1) is not loaded";
    return api;
  }
  auto resolve = [&](void* library, auto& entry, const char* symbol) {
    entry = reinterpret_cast<std::remove_reference_t<decltype(entry)>>(dlsym(library, symbol));
    if (entry == nullptr && api.error.empty()) {
      api.error = absl::StrCat(api.library, " has no ", symbol,
                               " (CUPTI's range profiler needs CUDA 12.6 or later)");
    }
  };
  resolve(cupti, api.GetResultString, "cuptiGetResultString");
  resolve(cupti, api.ProfilerInitialize, "cuptiProfilerInitialize");
  resolve(cupti, api.ProfilerDeInitialize, "cuptiProfilerDeInitialize");
  resolve(cupti, api.Subscribe, "cuptiSubscribe");
  resolve(cupti, api.Unsubscribe, "cuptiUnsubscribe");
  resolve(cupti, api.EnableDomain, "cuptiEnableDomain");
  resolve(cupti, api.DeviceGetChipName, "cuptiDeviceGetChipName");
  resolve(cupti, api.GetCounterAvailability, "cuptiProfilerGetCounterAvailability");
  resolve(cupti, api.HostInitialize, "cuptiProfilerHostInitialize");
  resolve(cupti, api.HostDeinitialize, "cuptiProfilerHostDeinitialize");
  resolve(cupti, api.HostConfigAddMetrics, "cuptiProfilerHostConfigAddMetrics");
  resolve(cupti, api.HostGetConfigImageSize, "cuptiProfilerHostGetConfigImageSize");
  resolve(cupti, api.HostGetConfigImage, "cuptiProfilerHostGetConfigImage");
  resolve(cupti, api.HostGetRangeName, "cuptiProfilerHostGetRangeName");
  resolve(cupti, api.HostEvaluateToGpuValues, "cuptiProfilerHostEvaluateToGpuValues");
  resolve(cupti, api.RangeEnable, "cuptiRangeProfilerEnable");
  resolve(cupti, api.RangeDisable, "cuptiRangeProfilerDisable");
  resolve(cupti, api.RangeGetCounterDataSize, "cuptiRangeProfilerGetCounterDataSize");
  resolve(cupti, api.RangeCounterDataImageInitialize,
          "cuptiRangeProfilerCounterDataImageInitialize");
  resolve(cupti, api.RangeSetConfig, "cuptiRangeProfilerSetConfig");
  resolve(cupti, api.RangeStart, "cuptiRangeProfilerStart");
  resolve(cupti, api.RangeStop, "cuptiRangeProfilerStop");
  resolve(cupti, api.RangeDecodeData, "cuptiRangeProfilerDecodeData");
  resolve(cupti, api.RangeGetCounterDataInfo, "cuptiRangeProfilerGetCounterDataInfo");
  resolve(driver, api.CtxGetCurrent, "cuCtxGetCurrent");
  resolve(driver, api.CtxSynchronize, "cuCtxSynchronize");
  return api;
}

const Api& Library() {
  static const Api api = Open();
  return api;
}

// A CUPTI parameter struct: zeroed, its size set (CUPTI checks it).
template <typename Struct>
Struct Params(size_t size) {
  Struct params{};
  params.structSize = size;
  return params;
}
#define ICD_CUPTI_PARAMS(Type) Params<Type>(Type##_STRUCT_SIZE)

// FAILED_PRECONDITION naming the call and CUPTI's reason; privileges get
// the setting that grants them.
absl::Status Check(const Api& api, CUptiResult result, const char* call) {
  if (result == CUPTI_SUCCESS) return absl::OkStatus();
  const char* text = nullptr;
  if (api.GetResultString(result, &text) != CUPTI_SUCCESS || text == nullptr) text = "";
  std::string hint;
  if (result == CUPTI_ERROR_INSUFFICIENT_PRIVILEGES) {
    hint = " (the driver lets only administrators read the GPU's performance counters: "
           "NVreg_RestrictProfilingToAdminUsers=0, or a container with CAP_SYS_ADMIN)";
  }
  return absl::FailedPreconditionError(absl::StrCat("hardware counters: ", call, " failed: ",
                                                    text, " (CUPTI ", result, ")", hint));
}

#define ICD_CUPTI(api, call, params) ICD_RETURN_IF_ERROR(Check(api, api.call(&params), #call))

// The host object (metric configuration and evaluation) and the range
// profiler on the context, released in reverse order.
class Session {
 public:
  explicit Session(const Api& api) : api_(api) {}
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session() {
    if (profiler_ != nullptr) {
      auto disable = ICD_CUPTI_PARAMS(CUpti_RangeProfiler_Disable_Params);
      disable.pRangeProfilerObject = profiler_;
      api_.RangeDisable(&disable);
    }
    if (host_ != nullptr) {
      auto deinit = ICD_CUPTI_PARAMS(CUpti_Profiler_Host_Deinitialize_Params);
      deinit.pHostObject = host_;
      api_.HostDeinitialize(&deinit);
    }
  }

  absl::Status Configure(int device_index, CUcontext context,
                         const std::vector<const char*>& metrics, Replay replay,
                         int64_t max_launches) {
    auto chip = ICD_CUPTI_PARAMS(CUpti_Device_GetChipName_Params);
    chip.deviceIndex = static_cast<size_t>(device_index);
    ICD_CUPTI(api_, DeviceGetChipName, chip);
    chip_ = chip.pChipName;

    auto availability = ICD_CUPTI_PARAMS(CUpti_Profiler_GetCounterAvailability_Params);
    availability.ctx = context;
    ICD_CUPTI(api_, GetCounterAvailability, availability);
    std::vector<uint8_t> availability_image(availability.counterAvailabilityImageSize);
    availability.pCounterAvailabilityImage = availability_image.data();
    ICD_CUPTI(api_, GetCounterAvailability, availability);

    auto host = ICD_CUPTI_PARAMS(CUpti_Profiler_Host_Initialize_Params);
    host.profilerType = CUPTI_PROFILER_TYPE_RANGE_PROFILER;
    host.pChipName = chip_.c_str();
    host.pCounterAvailabilityImage = availability_image.data();
    ICD_CUPTI(api_, HostInitialize, host);
    host_ = host.pHostObject;

    auto add = ICD_CUPTI_PARAMS(CUpti_Profiler_Host_ConfigAddMetrics_Params);
    add.pHostObject = host_;
    add.ppMetricNames = const_cast<const char**>(metrics.data());
    add.numMetrics = metrics.size();
    ICD_CUPTI(api_, HostConfigAddMetrics, add);
    auto config_size = ICD_CUPTI_PARAMS(CUpti_Profiler_Host_GetConfigImageSize_Params);
    config_size.pHostObject = host_;
    ICD_CUPTI(api_, HostGetConfigImageSize, config_size);
    config_.resize(config_size.configImageSize);
    auto config = ICD_CUPTI_PARAMS(CUpti_Profiler_Host_GetConfigImage_Params);
    config.pHostObject = host_;
    config.configImageSize = config_.size();
    config.pConfigImage = config_.data();
    ICD_CUPTI(api_, HostGetConfigImage, config);

    auto enable = ICD_CUPTI_PARAMS(CUpti_RangeProfiler_Enable_Params);
    enable.ctx = context;
    ICD_CUPTI(api_, RangeEnable, enable);
    profiler_ = enable.pRangeProfilerObject;

    auto data_size = ICD_CUPTI_PARAMS(CUpti_RangeProfiler_GetCounterDataSize_Params);
    data_size.pRangeProfilerObject = profiler_;
    data_size.pMetricNames = const_cast<const char**>(metrics.data());
    data_size.numMetrics = metrics.size();
    data_size.maxNumOfRanges = static_cast<size_t>(max_launches);
    data_size.maxNumRangeTreeNodes = static_cast<uint32_t>(max_launches);
    ICD_CUPTI(api_, RangeGetCounterDataSize, data_size);
    counter_data_.resize(data_size.counterDataSize);
    auto init = ICD_CUPTI_PARAMS(CUpti_RangeProfiler_CounterDataImage_Initialize_Params);
    init.pRangeProfilerObject = profiler_;
    init.counterDataSize = counter_data_.size();
    init.pCounterData = counter_data_.data();
    ICD_CUPTI(api_, RangeCounterDataImageInitialize, init);

    // Auto ranges: each kernel launch its own range (Replay says how the
    // passes run).
    auto set = ICD_CUPTI_PARAMS(CUpti_RangeProfiler_SetConfig_Params);
    set.pRangeProfilerObject = profiler_;
    set.configSize = config_.size();
    set.pConfig = config_.data();
    set.counterDataImageSize = counter_data_.size();
    set.pCounterDataImage = counter_data_.data();
    set.range = CUPTI_AutoRange;
    set.replayMode = replay == Replay::kUser ? CUPTI_UserReplay : CUPTI_KernelReplay;
    set.maxRangesPerPass = static_cast<size_t>(max_launches);
    set.numNestingLevels = 1;
    set.minNestingLevel = 1;
    set.passIndex = 0;
    set.targetNestingLevel = 1;
    ICD_CUPTI(api_, RangeSetConfig, set);
    return absl::OkStatus();
  }

  absl::Status Start() {
    auto start = ICD_CUPTI_PARAMS(CUpti_RangeProfiler_Start_Params);
    start.pRangeProfilerObject = profiler_;
    ICD_CUPTI(api_, RangeStart, start);
    return absl::OkStatus();
  }

  // Ends a pass; true when every pass the metrics need has run.
  absl::StatusOr<bool> Stop() {
    auto stop = ICD_CUPTI_PARAMS(CUpti_RangeProfiler_Stop_Params);
    stop.pRangeProfilerObject = profiler_;
    ICD_CUPTI(api_, RangeStop, stop);
    return stop.isAllPassSubmitted != 0;
  }

  // Decodes the passes' counts into the counter data image; the launches
  // that did not fit are an error.
  absl::Status Decode(int64_t max_launches) {
    auto decode = ICD_CUPTI_PARAMS(CUpti_RangeProfiler_DecodeData_Params);
    decode.pRangeProfilerObject = profiler_;
    ICD_CUPTI(api_, RangeDecodeData, decode);
    if (decode.numOfRangeDropped > 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "hardware counters: the work launched more than ", max_launches, " kernels (",
          decode.numOfRangeDropped, " dropped); count a shorter piece of work"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<KernelCounters>> Read(const std::vector<const char*>& metrics) {
    auto info = ICD_CUPTI_PARAMS(CUpti_RangeProfiler_GetCounterDataInfo_Params);
    info.pCounterDataImage = counter_data_.data();
    info.counterDataImageSize = counter_data_.size();
    ICD_CUPTI(api_, RangeGetCounterDataInfo, info);
    std::vector<KernelCounters> launches;
    std::vector<double> values(metrics.size());
    for (size_t range = 0; range < info.numTotalRanges; ++range) {
      auto name = ICD_CUPTI_PARAMS(CUpti_Profiler_Host_GetRangeName_Params);
      name.pCounterDataImage = counter_data_.data();
      name.counterDataImageSize = counter_data_.size();
      name.rangeIndex = range;
      name.delimiter = "/";
      ICD_CUPTI(api_, HostGetRangeName, name);
      auto evaluate = ICD_CUPTI_PARAMS(CUpti_Profiler_Host_EvaluateToGpuValues_Params);
      evaluate.pHostObject = host_;
      evaluate.pCounterDataImage = counter_data_.data();
      evaluate.counterDataImageSize = counter_data_.size();
      evaluate.rangeIndex = range;
      evaluate.ppMetricNames = const_cast<const char**>(metrics.data());
      evaluate.numMetrics = metrics.size();
      evaluate.pMetricValues = values.data();
      ICD_CUPTI(api_, HostEvaluateToGpuValues, evaluate);
      KernelCounters launch;
      launch.kernel = name.pRangeName != nullptr ? name.pRangeName : "";
      launch.launches = 1;
      launch.dram_read_bytes = values[0];
      launch.dram_write_bytes = values[1];
      launch.l2_sectors = values[2];
      launch.l2_hit_rate = values[3] / 100.0;
      launch.duration_ns = values[4];
      launches.push_back(std::move(launch));
    }
    return launches;
  }

 private:
  const Api& api_;
  std::string chip_;
  CUpti_Profiler_Host_Object* host_ = nullptr;
  CUpti_RangeProfiler_Object* profiler_ = nullptr;
  std::vector<uint8_t> config_;
  std::vector<uint8_t> counter_data_;
};

// The range profiler names an auto range by its index; the kernels' names
// come from CUPTI's launch callbacks, in launch order. A runtime launch calls
// the driver inside it: only the outermost launch of a thread is recorded.
class KernelNames {
 public:
  explicit KernelNames(const Api& api) : api_(api) {
    if (api_.Subscribe(&subscriber_, &KernelNames::OnCallback, this) != CUPTI_SUCCESS) {
      subscriber_ = nullptr;  // another subscriber (a profiler) holds CUPTI: no names
      return;
    }
    api_.EnableDomain(1, subscriber_, CUPTI_CB_DOMAIN_RUNTIME_API);
    api_.EnableDomain(1, subscriber_, CUPTI_CB_DOMAIN_DRIVER_API);
  }
  KernelNames(const KernelNames&) = delete;
  KernelNames& operator=(const KernelNames&) = delete;
  ~KernelNames() {
    if (subscriber_ != nullptr) api_.Unsubscribe(subscriber_);
  }

  bool subscribed() const { return subscriber_ != nullptr; }

  std::vector<std::string> Take() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(names_, {});  // empty again for the next piece's launches
  }

 private:
  static bool IsLaunch(CUpti_CallbackDomain domain, CUpti_CallbackId id) {
    if (domain == CUPTI_CB_DOMAIN_RUNTIME_API) {
      switch (id) {
        case CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernel_v7000:
        case CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernel_ptsz_v7000:
        case CUPTI_RUNTIME_TRACE_CBID_cudaLaunchCooperativeKernel_v9000:
        case CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernelExC_v11060:
        case CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernelExC_ptsz_v11060:
        case CUPTI_RUNTIME_TRACE_CBID___cudaLaunchKernel_v13000:
        case CUPTI_RUNTIME_TRACE_CBID___cudaLaunchKernel_ptsz_v13000:
          return true;
        default:
          return false;
      }
    }
    if (domain == CUPTI_CB_DOMAIN_DRIVER_API) {
      switch (id) {
        case CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel:
        case CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel_ptsz:
        case CUPTI_DRIVER_TRACE_CBID_cuLaunchCooperativeKernel:
        case CUPTI_DRIVER_TRACE_CBID_cuLaunchCooperativeKernel_ptsz:
        case CUPTI_DRIVER_TRACE_CBID_cuLaunchKernelEx:
        case CUPTI_DRIVER_TRACE_CBID_cuLaunchKernelEx_ptsz:
          return true;
        default:
          return false;
      }
    }
    return false;
  }

  static void CUPTIAPI OnCallback(void* self, CUpti_CallbackDomain domain, CUpti_CallbackId id,
                                  const void* data) {
    if (!IsLaunch(domain, id)) return;
    thread_local int depth = 0;
    const auto* call = static_cast<const CUpti_CallbackData*>(data);
    if (call->callbackSite == CUPTI_API_EXIT) {
      --depth;
      return;
    }
    if (depth++ > 0) return;
    auto* names = static_cast<KernelNames*>(self);
    const std::lock_guard<std::mutex> lock(names->mutex_);
    names->names_.push_back(Demangled(call->symbolName));
  }

  // "void ns::Kernel<128>(Args...)" -> "ns::Kernel<128>"
  static std::string Demangled(const char* symbol) {
    if (symbol == nullptr) return "";
    int status = 0;
    char* plain = abi::__cxa_demangle(symbol, nullptr, nullptr, &status);
    std::string name = status == 0 && plain != nullptr ? plain : symbol;
    std::free(plain);
    if (name.rfind("void ", 0) == 0) name.erase(0, 5);
    int angle = 0;
    for (size_t i = 0; i < name.size(); ++i) {
      if (name[i] == '<') ++angle;
      if (name[i] == '>') --angle;
      if (name[i] == '(' && angle == 0 && name.compare(i, 21, "(anonymous namespace)") != 0) {
        name.resize(i);
        break;
      }
    }
    return name;
  }

  const Api& api_;
  CUpti_SubscriberHandle subscriber_ = nullptr;
  std::mutex mutex_;
  std::vector<std::string> names_;
};

// The profiler initialised for one collection, and de-initialised after it
// (left initialised, CUPTI tore down badly at the process's exit).
class ProfilerScope {
 public:
  explicit ProfilerScope(const Api& api) : api_(api) {}
  ProfilerScope(const ProfilerScope&) = delete;
  ProfilerScope& operator=(const ProfilerScope&) = delete;
  absl::Status Initialize() {
    auto init = ICD_CUPTI_PARAMS(CUpti_Profiler_Initialize_Params);
    ICD_RETURN_IF_ERROR(Check(api_, api_.ProfilerInitialize(&init), "cuptiProfilerInitialize"));
    initialized_ = true;
    return absl::OkStatus();
  }
  ~ProfilerScope() {
    if (!initialized_) return;
    auto deinit =
        ICD_CUPTI_PARAMS(CUpti_Profiler_DeInitialize_Params);
    api_.ProfilerDeInitialize(&deinit);
  }

 private:
  const Api& api_;
  bool initialized_ = false;
};

std::mutex& CollectionMutex() {
  static std::mutex mutex;
  return mutex;
}

// ICD_COUNTERS_TRACE=1: each collection's phases and their wall time on
// stderr (a collection costs seconds whatever the work; this says where).
class PhaseTrace {
 public:
  PhaseTrace() : on_(std::getenv("ICD_COUNTERS_TRACE") != nullptr), last_(Clock::now()) {}
  void Mark(const char* phase) {
    if (!on_) return;
    const auto now = Clock::now();
    absl::StrAppend(&line_, line_.empty() ? "" : ", ", phase, " ",
                    std::chrono::duration<double, std::milli>(now - last_).count(), " ms");
    last_ = now;
  }
  ~PhaseTrace() {
    if (on_) std::cerr << "icd counters: " << line_ << "\n";
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool on_;
  Clock::time_point last_;
  std::string line_;
};

}  // namespace

absl::StatusOr<std::optional<int64_t>> CountLaunches(const std::function<absl::Status()>& work) {
  const std::lock_guard<std::mutex> one_at_a_time(CollectionMutex());
  const Api& api = Library();
  if (!api.error.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("hardware counters: ", api.error));
  }
  KernelNames names(api);
  ICD_RETURN_IF_ERROR(work());
  if (!names.subscribed()) return std::nullopt;
  return static_cast<int64_t>(names.Take().size());
}

absl::StatusOr<std::vector<std::vector<KernelCounters>>> CollectEach(
    int device_index, const std::vector<std::function<absl::Status()>>& work_pieces,
    Replay replay, const std::function<absl::Status()>& rewind, int64_t max_launches,
    const std::function<absl::Status()>& flush) {
  if (work_pieces.empty()) {
    return absl::InvalidArgumentError("hardware counters: no work to count");
  }
  // The flush is a piece of its own, first, whose ranges are dropped at the
  // end; room for its few launches beside the work's.
  const bool flushed = flush != nullptr && replay == Replay::kUser;
  constexpr int64_t kFlushRoom = 8;
  const int64_t room = max_launches + (flushed ? kFlushRoom : 0);
  std::vector<std::function<absl::Status()>> pieces;
  if (flushed) pieces.push_back(flush);
  pieces.insert(pieces.end(), work_pieces.begin(), work_pieces.end());
  const std::lock_guard<std::mutex> one_at_a_time(CollectionMutex());
  PhaseTrace trace;
  const Api& api = Library();
  if (!api.error.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("hardware counters: ", api.error));
  }
  ProfilerScope profiler(api);
  ICD_RETURN_IF_ERROR(profiler.Initialize());
  trace.Mark("initialize");
  CUcontext context = nullptr;
  if (api.CtxGetCurrent(&context) != CUDA_SUCCESS || context == nullptr) {
    return absl::FailedPreconditionError(
        "hardware counters: no CUDA context is current on the calling thread");
  }
  std::vector<const char*> metrics;
  for (const std::string& name : MetricNames()) metrics.push_back(name.c_str());

  Session session(api);
  ICD_RETURN_IF_ERROR(session.Configure(device_index, context, metrics, replay, room));
  KernelNames names(api);
  trace.Mark("configure");
  // Kernel replay ends after one pass; user replay after as many as the
  // metrics need (a few for these five).
  constexpr int kMaxPasses = 64;
  int passes = 0;
  std::vector<std::string> launched;  // every pass's launches, in order
  std::vector<size_t> piece_launches;  // the first pass's launches of each piece
  bool same_pieces = true;             // every pass's pieces launched as many as the first's
  for (bool all_passes = false; !all_passes;) {
    if (++passes > kMaxPasses) {
      return absl::FailedPreconditionError(absl::StrCat(
          "hardware counters: the metrics still wanted passes after ", kMaxPasses));
    }
    if (passes > 1 && rewind) ICD_RETURN_IF_ERROR(rewind());
    (void)names.Take();  // the rewind's own launches, if any, are not the pass's
    ICD_RETURN_IF_ERROR(session.Start());
    absl::Status ran;
    for (size_t piece = 0; piece < pieces.size() && ran.ok(); ++piece) {
      ran = pieces[piece]();
      // The callbacks run on the launching thread, inside the launch: when
      // the piece returns, its launches are all named.
      std::vector<std::string> piece_names = names.Take();
      if (passes == 1) {
        piece_launches.push_back(piece_names.size());
      } else {
        same_pieces = same_pieces && piece_launches[piece] == piece_names.size();
      }
      launched.insert(launched.end(), std::make_move_iterator(piece_names.begin()),
                      std::make_move_iterator(piece_names.end()));
    }
    if (ran.ok() && api.CtxSynchronize() != CUDA_SUCCESS) {
      ran = absl::InternalError("hardware counters: the work's kernels failed (cuCtxSynchronize)");
    }
    absl::StatusOr<bool> stopped = session.Stop();
    ICD_RETURN_IF_ERROR(ran);
    ICD_ASSIGN_OR_RETURN(all_passes, std::move(stopped));
  }
  // Each pass must have launched the same kernels, or its counts belong to
  // other launches than the first pass's (checked before CUPTI decodes them).
  const size_t per_pass = launched.size() / static_cast<size_t>(passes);
  bool same_passes = same_pieces && launched.size() % static_cast<size_t>(passes) == 0;
  for (size_t i = per_pass; same_passes && i < launched.size(); ++i) {
    same_passes = launched[i] == launched[i % per_pass];
  }
  if (replay == Replay::kUser && passes > 1 && !same_passes) {
    return absl::FailedPreconditionError(absl::StrCat(
        "hardware counters: the work launched different kernels in its ", passes,
        " passes (", launched.size(), " launches in all); each pass must repeat the first"));
  }
  if (replay == Replay::kUser && passes > 1 && launched.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "hardware counters: the metrics took ", passes, " passes, and CUPTI's launch callbacks "
        "are held by another client (a profiler?), so the passes cannot be checked to have "
        "launched the same kernels"));
  }
  trace.Mark(absl::StrCat(passes, " passes of ", launched.size() / std::max(passes, 1),
                          " launches").c_str());
  ICD_RETURN_IF_ERROR(session.Decode(max_launches));
  trace.Mark("decode");
  ICD_ASSIGN_OR_RETURN(std::vector<KernelCounters> launches, session.Read(metrics));
  trace.Mark("evaluate");
  // Names only when every range has its launch; else CUPTI's range names.
  const bool named = same_passes && per_pass == launches.size();
  if (named) {
    for (size_t i = 0; i < launches.size(); ++i) launches[i].kernel = std::move(launched[i]);
  } else {
    for (KernelCounters& launch : launches) launch.kernel = "launch " + launch.kernel;
  }
  std::vector<std::vector<KernelCounters>> by_piece;
  if (pieces.size() == 1) {
    by_piece.push_back(std::move(launches));
    return by_piece;
  }
  // The pieces apart by their launches, which only the names tell.
  if (!named) {
    return absl::FailedPreconditionError(absl::StrCat(
        "hardware counters: ", launches.size(), " ranges could not be told apart between ",
        work_pieces.size(), flushed ? " pieces of work and the L2 flush" : " pieces of work",
        " (CUPTI's launch callbacks are held by another client, a profiler?, or the ranges are "
        "not the launches)"));
  }
  auto next = launches.begin();
  for (const size_t count : piece_launches) {
    by_piece.emplace_back(std::make_move_iterator(next),
                          std::make_move_iterator(next + static_cast<std::ptrdiff_t>(count)));
    next += static_cast<std::ptrdiff_t>(count);
  }
  if (flushed) by_piece.erase(by_piece.begin());
  return by_piece;
}

#endif  // ICD_HAVE_CUPTI

}  // namespace icd::counters
