#include "convert.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "icd/core/checked.h"

namespace icd::rpc {

void ToProto(const ModelInfo& in, v1::ModelInfo* out) {
  out->set_name(in.name);
  out->set_family(std::string(FamilyName(in.family)));
  out->set_architecture(in.architecture);
  out->set_layout(std::string(LayoutName(in.layout)));
  out->set_device(in.device);
  out->set_dtype(std::string(DTypeName(in.dtype)));
  out->set_parameters(in.parameters);
  out->set_version(in.version);
  out->set_fingerprint(in.fingerprint);
  for (const auto& [k, v] : in.dims) (*out->mutable_dims())[k] = v;
  out->set_path(in.path);
  out->set_device_bytes(in.device_bytes);
  for (const LayerRange& range : in.placement) {
    v1::LayerRange* entry = out->add_placement();
    entry->set_device(range.device);
    entry->set_first_layer(range.first);
    entry->set_last_layer(range.last);
    entry->set_bytes(range.bytes);
  }
}

void ToProto(const GroupInfo& in, v1::Group* out) {
  out->set_name(in.name);
  out->set_size(in.size);
  out->set_block(in.block);
  out->set_whole(in.whole);
  for (const auto& m : in.members) {
    v1::Member* pm = out->add_members();
    pm->set_tensor(m.tensor);
    pm->set_axis(m.axis);
    pm->set_offset(m.offset);
    pm->set_length(m.length);
    pm->set_expand(m.expand);
    for (const std::string& tensor : m.tensors) pm->add_tensors(tensor);
    if (m.slice >= 0) pm->set_slice(m.slice);
  }
}

void ToProto(const CorrectnessReport& in, v1::CorrectnessReport* out) {
  out->set_ok(in.ok);
  out->set_rel_l2(in.rel_l2);
  out->set_max_abs(in.max_abs);
  out->set_max_rel(in.max_rel);
  out->set_top1_agreement(in.top1_agreement);
  out->set_tolerance(in.tolerance);
  out->set_tokens(in.tokens);
}

void ToProto(const ApplyReport& in, v1::ApplyReport* out) {
  out->set_version(in.version);
  if (in.verified) ToProto(in.correctness, out->mutable_correctness());
  out->set_apply_ms(in.apply_ms);
  for (const auto& g : in.groups) out->add_groups(g);
  out->set_verified(in.verified);
  out->set_verify_ms(in.verify_ms);
}

void ToProto(const EvaluateResult& in, v1::EvaluateResponse* out) {
  for (int64_t d : in.shape) out->add_shape(d);
  out->mutable_logits()->Add(in.logits.begin(), in.logits.end());
  out->set_mean_nll(in.mean_nll);
  out->set_tokens(in.tokens);
}

void ToProto(const ExportResult& in, v1::ExportReport* out) {
  out->set_path(in.path);
  for (const auto& f : in.files) out->add_files(f);
  out->set_version(in.version);
}

LoadOptions FromProto(const v1::LoadModelRequest& in) {
  LoadOptions out;
  out.device = in.device();
  out.dtype = in.dtype();
  out.placement = in.placement();
  return out;
}

std::vector<Permutation> FromProto(
    const google::protobuf::RepeatedPtrField<v1::Permutation>& in) {
  std::vector<Permutation> out;
  out.reserve(static_cast<std::size_t>(in.size()));
  for (const auto& p : in) {
    Permutation q;
    q.group = p.group();
    q.index.assign(p.index().begin(), p.index().end());
    out.push_back(std::move(q));
  }
  return out;
}

ApplyOptions ApplyOptionsFromProto(const v1::ApplyRequest& in) {
  ApplyOptions out;
  out.skip_verify = in.skip_verify();
  out.expected_version = in.expected_version();
  out.tolerance = in.tolerance();
  return out;
}

EvaluateRequest FromProto(const v1::EvaluateRequest& in) {
  EvaluateRequest out;
  out.input_ids.assign(in.input_ids().begin(), in.input_ids().end());
  out.batch = in.batch();  // the engine reads 0 as one row and refuses < 0
  out.return_logits = in.return_logits();
  return out;
}

LatencyOptions FromProto(const v1::LatencyRequest& in) {
  LatencyOptions out;
  out.model = in.model();
  out.compare_model = in.compare_model();
  if (!in.mode().empty()) out.mode = in.mode();
  out.eager = in.eager();
  if (in.batch() != 0) out.batch = in.batch();
  if (in.seq_len() != 0) out.seq_len = in.seq_len();
  out.warmup = in.warmup();
  if (in.iters() != 0) out.iters = in.iters();
  out.counter_repeats = in.counter_repeats();
  return out;
}

namespace {

void ToProto(const KernelCounters& in, v1::KernelCounters* out) {
  out->set_kernel(in.kernel);
  out->set_launches(in.launches);
  out->set_dram_read_bytes(in.dram_read_bytes);
  out->set_dram_write_bytes(in.dram_write_bytes);
  out->set_l2_sectors(in.l2_sectors);
  out->set_l2_hit_rate(in.l2_hit_rate);
  out->set_duration_ns(in.duration_ns);
}

void ToProto(const CounterReport& in, v1::CounterReport* out) {
  out->set_method(in.method);
  out->set_execution(in.execution);
  for (const KernelCounters& kernel : in.kernels) ToProto(kernel, out->add_kernels());
  ToProto(in.total, out->mutable_total());
  for (const KernelCounters& total : in.repeat_totals) ToProto(total, out->add_repeat_totals());
}

void ToProto(const LatencyTiming& in, v1::LatencyReport* out) {
  out->set_median_ms(in.median_ms);
  out->set_p10_ms(in.p10_ms);
  out->set_p90_ms(in.p90_ms);
  out->set_ci95_low_ms(in.ci95_low_ms);
  out->set_ci95_high_ms(in.ci95_high_ms);
  out->set_samples(in.samples);
  out->set_device(in.device);
  out->set_method(in.method);
  out->set_execution(in.execution);
  out->set_version(in.version);
  out->set_transfer_ms(in.transfer_ms);
  if (in.counters.has_value()) ToProto(*in.counters, out->mutable_counters());
}

}  // namespace

void ToProto(const LatencyReport& in, v1::LatencyReport* out) {
  ToProto(in.timing, out);
  if (in.compare.has_value()) ToProto(*in.compare, out->mutable_compare());
  out->set_ratio(in.ratio);
  out->set_ratio_ci95_low(in.ratio_ci95_low);
  out->set_ratio_ci95_high(in.ratio_ci95_high);
}

void ToProto(const SolverOptions& in, v1::SolverOptions* out) {
  out->set_objective(in.objective);
  out->set_statistic(in.statistic);
  out->set_activation_quantile(in.activation_quantile);
  out->set_resolution(in.resolution);
  out->set_seed(in.seed);
  out->set_seeds(in.seeds);
  out->set_nm_n(in.nm_n);
  out->set_nm_m(in.nm_m);
  out->set_preserve_block(in.preserve_block);
  out->mutable_block_sizes()->Add(in.block_sizes.begin(), in.block_sizes.end());
  out->set_return_graph(in.return_graph);
}

void ToProto(const BlocksTouched& in, v1::BlocksTouched* out) {
  out->set_block(in.block);
  out->set_identity(in.identity);
  out->set_solved(in.solved);
}

void ToProto(const PermutationResult& in, v1::PermutationResult* out) {
  v1::Permutation* perm = out->mutable_permutation();
  perm->set_group(in.permutation.group);
  perm->mutable_index()->Add(in.permutation.index.begin(),
                             in.permutation.index.end());
  out->set_modularity(in.modularity);
  out->set_modularity_null(in.modularity_null);
  out->set_structure_found(in.structure_found);
  out->set_ari(in.ari);
  out->set_clusters(in.clusters);
  for (const auto& b : in.blocks) ToProto(b, out->add_blocks());
  out->set_nm_efficacy(in.nm_efficacy);
  out->set_nm_kept_identity(in.nm_kept_identity);
  out->set_nm_kept_solved(in.nm_kept_solved);
  out->set_nm_upper_bound(in.nm_upper_bound);
  out->set_tokens(in.tokens);
  out->set_holdout_tokens(in.holdout_tokens);
  out->set_scores_note(in.scores_note);
  out->set_solve_ms(in.solve_ms);
  if (!in.graph.empty()) {
    static_assert(std::numeric_limits<float>::is_iec559 &&
                      __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
                  "the host's floats are the wire's float32 little-endian");
    out->set_graph_f32_le(reinterpret_cast<const char*>(in.graph.data()),
                          in.graph.size() * sizeof(float));
  }
}

SolverOptions FromProto(const v1::SolverOptions& in) {
  SolverOptions out;
  out.objective = in.objective();
  out.statistic = in.statistic();
  out.activation_quantile = in.activation_quantile();
  out.resolution = in.resolution();
  out.seed = in.seed();
  out.seeds = in.seeds();
  out.nm_n = in.nm_n();
  out.nm_m = in.nm_m();
  out.preserve_block = in.preserve_block();
  out.block_sizes.assign(in.block_sizes().begin(), in.block_sizes().end());
  out.return_graph = in.return_graph();
  return out;
}

BlocksTouched FromProto(const v1::BlocksTouched& in) {
  BlocksTouched out;
  out.block = in.block();
  out.identity = in.identity();
  out.solved = in.solved();
  return out;
}

PermutationResult FromProto(const v1::PermutationResult& in) {
  PermutationResult out;
  out.permutation.group = in.permutation().group();
  out.permutation.index.assign(in.permutation().index().begin(),
                               in.permutation().index().end());
  out.modularity = in.modularity();
  out.modularity_null = in.modularity_null();
  out.structure_found = in.structure_found();
  out.ari = in.ari();
  out.clusters = in.clusters();
  for (const auto& b : in.blocks()) out.blocks.push_back(FromProto(b));
  out.nm_efficacy = in.nm_efficacy();
  out.nm_kept_identity = in.nm_kept_identity();
  out.nm_kept_solved = in.nm_kept_solved();
  out.nm_upper_bound = in.nm_upper_bound();
  out.tokens = in.tokens();
  out.holdout_tokens = in.holdout_tokens();
  out.scores_note = in.scores_note();
  out.solve_ms = in.solve_ms();
  out.graph.resize(in.graph_f32_le().size() / sizeof(float));
  std::memcpy(out.graph.data(), in.graph_f32_le().data(), out.graph.size() * sizeof(float));
  return out;
}

TraceHeader FromProto(const v1::TraceHeader& in) {
  TraceHeader out;
  out.model = in.model();
  out.group = in.group();
  out.channels = in.channels();
  out.holdout_rows = in.holdout_rows();
  out.solver = FromProto(in.solver());
  return out;
}

CaptureRequest FromProto(const v1::CaptureRequest& in) {
  CaptureRequest out;
  out.model = in.model();
  out.input_ids.assign(in.input_ids().begin(), in.input_ids().end());
  out.batch = in.batch();
  out.holdout_ids.assign(in.holdout_ids().begin(), in.holdout_ids().end());
  out.groups.assign(in.groups().begin(), in.groups().end());
  out.solver = FromProto(in.solver());
  return out;
}

std::vector<v1::TensorChunk> SplitTensor(const HostTensor& tensor, std::size_t max_data_bytes,
                                         std::size_t max_message_bytes) {
  // Name, dtype, shape (at most 11 bytes per varint) and field tags, with
  // room to spare.
  const std::size_t header = tensor.name.size() + 11 * tensor.shape.size() + 64;
  std::size_t max_bytes = max_message_bytes > header ? max_message_bytes - header : 1;
  max_bytes = std::max<std::size_t>(1, std::min(max_bytes, max_data_bytes));
  std::vector<v1::TensorChunk> out;
  std::size_t pos = 0;
  do {
    v1::TensorChunk c;
    c.set_name(tensor.name);
    for (int64_t d : tensor.shape) c.add_shape(d);
    c.set_dtype(std::string(DTypeName(tensor.dtype)));
    const std::size_t n = std::min(max_bytes, tensor.data.size() - pos);
    c.set_data(tensor.data.data() + pos, n);
    pos += n;
    c.set_last(pos >= tensor.data.size());
    out.push_back(std::move(c));
  } while (pos < tensor.data.size());
  return out;
}

absl::Status TensorAssembler::Add(const v1::TensorChunk& chunk) {
  if (!open_) {
    if (chunk.name().empty()) {
      if (chunk.data().empty() && !chunk.last()) return absl::OkStatus();
      return absl::InvalidArgumentError("tensor chunk without a name");
    }
    for (const auto& t : tensors_) {
      if (t.name == chunk.name()) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor ", chunk.name(), " sent twice"));
      }
    }
    auto dtype = ParseDType(chunk.dtype());
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor ", chunk.name(), ": ", std::string(dtype.status().message())));
    }
    std::vector<int64_t> factors(chunk.shape().begin(), chunk.shape().end());
    factors.push_back(DTypeSize(*dtype));
    const absl::StatusOr<int64_t> declared =
        CheckedProduct(factors, absl::StrCat("tensor ", chunk.name(), ": shape x dtype size"));
    if (!declared.ok()) return declared.status();
    declared_bytes_ = *declared;
    limit_bytes_ = declared_bytes_;
    if (target_bytes_) {
      const absl::StatusOr<int64_t> target = target_bytes_(chunk.name());
      if (!target.ok()) return target.status();
      limit_bytes_ = std::min(limit_bytes_, *target);
    }
    HostTensor t;
    t.name = chunk.name();
    t.shape.assign(chunk.shape().begin(), chunk.shape().end());
    t.dtype = *dtype;
    tensors_.push_back(std::move(t));
    open_ = true;
  } else {
    const HostTensor& t = tensors_.back();
    if (chunk.name() != t.name) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk of tensor ", chunk.name(), " while tensor ",
                       t.name, " is not complete (no `last`)"));
    }
    const absl::StatusOr<DType> dtype =
        chunk.dtype().empty() ? absl::StatusOr<DType>(t.dtype)
                              : ParseDType(chunk.dtype());
    if (!std::equal(t.shape.begin(), t.shape.end(), chunk.shape().begin(),
                    chunk.shape().end()) ||
        !dtype.ok() || *dtype != t.dtype) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor ", t.name, ": chunks disagree on shape or dtype"));
    }
  }
  HostTensor& t = tensors_.back();
  if (chunk.data().size() > static_cast<uint64_t>(limit_bytes_) - t.data.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor ", t.name, ": more than ", limit_bytes_, " bytes sent; ",
        limit_bytes_ < declared_bytes_ ? "the model's tensor holds that many"
                                       : "its shape and dtype need that many"));
  }
  t.data += chunk.data();
  bytes_ += chunk.data().size();
  if (chunk.last()) return Close();
  return absl::OkStatus();
}

absl::Status TensorAssembler::Close() {
  open_ = false;
  const HostTensor& t = tensors_.back();
  const int64_t expected = declared_bytes_;
  if (static_cast<int64_t>(t.data.size()) != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", t.name, ": ", t.data.size(),
                     " bytes received, shape and dtype need ", expected));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<HostTensor>> TensorAssembler::Finish() {
  if (open_) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream ended inside tensor ", tensors_.back().name,
                     " (no chunk with `last`)"));
  }
  return std::move(tensors_);
}

}  // namespace icd::rpc
