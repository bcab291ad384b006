#include "io/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "blocks/shapes.h"
#include "io/config.h"
#include "icd/core/status_macros.h"
#include "io/safetensors.h"
#include "io/torch_bin.h"

namespace icd {
namespace fs = std::filesystem;
namespace {

// mamba_ssm's name for the embedding; HF's load hook renames it.
constexpr char kSsmEmbedding[] = "backbone.embedding.weight";

// The whole file, or InvalidArgument naming it when it holds more than
// `max_bytes` (read up to one byte past the cap, so a file that grows, or a
// device, cannot get more in).
absl::StatusOr<std::string> ReadText(const fs::path& file, int64_t max_bytes) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(file.string(), ": cannot open"));
  std::string text(static_cast<size_t>(max_bytes) + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  if (static_cast<int64_t>(text.size()) > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(file.string(), ": larger than ",
                                                   max_bytes >> 20, " MiB, the most a ",
                                                   file.filename().string(), " may have"));
  }
  return text;
}

// 64-bit FNV-1a over 8-byte words: fast enough to cover every weight byte.
class Fingerprint {
 public:
  void Add(const void* data, size_t size) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    size_t i = 0;
    for (; i + 8 <= size; i += 8) {
      uint64_t word;
      std::memcpy(&word, bytes + i, 8);
      Mix(word);
    }
    for (; i < size; ++i) Mix(bytes[i]);
  }
  void Add(const std::string& text) { Add(text.data(), text.size()); }
  std::string Hex() const { return absl::StrFormat("%016x", hash_); }

 private:
  void Mix(uint64_t word) {
    hash_ ^= word;
    hash_ *= 0x100000001b3ULL;
  }
  uint64_t hash_ = 0xcbf29ce484222325ULL;
};

bool PlainFileName(const std::string& name) {
  return !name.empty() && name.find('/') == std::string::npos && name != "." && name != "..";
}

// Which files to read: a single file or the shards an index lists.
absl::StatusOr<CheckpointLayout> FindWeightFiles(const fs::path& dir, const ModelConfig& config) {
  CheckpointLayout layout;
  struct Candidate {
    const char* file;
    WeightFormat format;
    bool index;
  };
  // Static tables: what each layout's save_pretrained writes, in preference order.
  static const Candidate kHfFiles[] = {
      {"model.safetensors", WeightFormat::kSafetensors, false},
      {"model.safetensors.index.json", WeightFormat::kSafetensors, true},
      {"pytorch_model.bin", WeightFormat::kTorchBin, false},
      {"pytorch_model.bin.index.json", WeightFormat::kTorchBin, true}};
  static const Candidate kSsmFiles[] = {{"pytorch_model.bin", WeightFormat::kTorchBin, false},
                                        {"model.safetensors", WeightFormat::kSafetensors, false}};
  const bool hf = config.layout == Layout::kHf;
  const std::vector<Candidate> candidates =
      hf ? std::vector<Candidate>(std::begin(kHfFiles), std::end(kHfFiles))
         : std::vector<Candidate>(std::begin(kSsmFiles), std::end(kSsmFiles));
  for (const Candidate& candidate : candidates) {
    const fs::path path = dir / candidate.file;
    if (!fs::is_regular_file(path)) continue;
    layout.format = candidate.format;
    // What HF writes; the engine does not read other metadata.
    if (candidate.format == WeightFormat::kSafetensors) layout.metadata = {{"format", "pt"}};
    if (!candidate.index) {
      layout.files.push_back({candidate.file, {}});
      return layout;
    }
    ICD_ASSIGN_OR_RETURN(std::string text, ReadText(path, kMaxIndexBytes));
    auto index = nlohmann::json::parse(text, nullptr, false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": not a shard index (no \"weight_map\" object)"));
    }
    layout.index_file = candidate.file;
    std::set<std::string> shards;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string() || !PlainFileName(file.get<std::string>())) {
        return absl::InvalidArgumentError(absl::StrCat(
            path.string(), ": tensor '", name, "' maps to ", file.dump(),
            ", not a file name inside the checkpoint directory"));
      }
      shards.insert(file.get<std::string>());
    }
    for (const std::string& shard : shards) layout.files.push_back({shard, {}});
    return layout;
  }
  std::vector<std::string> names;
  for (const Candidate& candidate : candidates) names.push_back(candidate.file);
  return absl::NotFoundError(absl::StrCat(dir.string(), ": no weights file (looked for ",
                                          absl::StrJoin(names, ", "), ")"));
}

absl::Status PollContext(const CallContext& ctx) { return CheckCall(ctx, "load"); }

}  // namespace

std::string LayoutTensorName(Layout layout, const std::string& canonical) {
  if (layout == Layout::kMambaSsm && canonical == kEmbeddingTensor) return kSsmEmbedding;
  return canonical;
}

std::string CanonicalTensorName(const std::string& stored) {
  // transformers' names under model. (NemotronH's under transformers 5;
  // Bamba's own: model.embed_tokens, model.layers.{i}.input_layernorm, mamba
  // or self_attn, pre_ff_layernorm, feed_forward, model.final_layernorm;
  // Granite 4.0's: post_attention_layernorm, shared_mlp, block_sparse_moe,
  // model.norm).
  constexpr char kModelPrefix[] = "model.";
  if (stored.rfind(kModelPrefix, 0) != 0) return stored == kSsmEmbedding ? kEmbeddingTensor : stored;
  static const std::pair<const char*, const char*> kTopLevel[] = {
      {"embed_tokens.", "embeddings."}, {"final_layernorm.", "norm_f."}, {"norm.", "norm_f."}};
  static const std::pair<const char*, const char*> kInLayer[] = {
      {"input_layernorm.", "norm."}, {"pre_ff_layernorm.", "norm2."}, {"mamba.", "mixer."},
      // Zamba2's hybrid layers hold their Mamba layer as mamba_decoder.
      {"mamba_decoder.mamba.", "mixer."}, {"mamba_decoder.input_layernorm.", "norm."},
      {"self_attn.", "mixer."},      {"feed_forward.", "mlp."},
      {"post_attention_layernorm.", "norm2."},
      {"shared_mlp.input_linear.", "mlp.fc1."},
      {"shared_mlp.output_linear.", "mlp.fc2."},
      {"block_sparse_moe.router.layer.", "moe.router."},
      {"block_sparse_moe.input_linear.", "moe.fc1."},
      {"block_sparse_moe.output_linear.", "moe.fc2."}};
  std::string rest = stored.substr(sizeof(kModelPrefix) - 1);
  for (const auto& [from, to] : kTopLevel) {
    if (rest.rfind(from, 0) == 0) rest = to + rest.substr(std::strlen(from));
  }
  constexpr char kLayers[] = "layers.";
  if (rest.rfind(kLayers, 0) == 0) {
    const size_t dot = rest.find('.', sizeof(kLayers) - 1);  // after the layer's index
    if (dot != std::string::npos) {
      for (const auto& [from, to] : kInLayer) {
        if (rest.compare(dot + 1, std::strlen(from), from) == 0) {
          rest = rest.substr(0, dot + 1) + to + rest.substr(dot + 1 + std::strlen(from));
          break;
        }
      }
    }
  }
  return CanonicalTensorName("backbone." + rest);
}

std::string CanonicalTensorName(const std::string& stored, const ModelConfig& config) {
  // Falcon-H1's attention sits beside its Mamba mixer: self_attn is "attn".
  const std::string self_attn = ".self_attn.";
  const size_t at = stored.find(self_attn);
  if (config.parallel_attention && at != std::string::npos) {
    return CanonicalTensorName(stored.substr(0, at) + ".attn." + stored.substr(at + self_attn.size()));
  }
  return CanonicalTensorName(stored);
}

std::string WeightKey(const std::string& stored, const ModelConfig& config) {
  const std::string canonical = CanonicalTensorName(stored, config);
  return canonical == kHeadTensor && config.tied ? kEmbeddingTensor : canonical;
}

bool PathIsUnder(const fs::path& path, const fs::path& root) {
  auto p = path.begin();
  for (auto r = root.begin(); r != root.end(); ++r, ++p) {
    if (r->empty()) continue;  // trailing separator of the root
    if (p == path.end() || *p != *r) return false;
  }
  return true;
}

absl::Status CheckFilesUnderRoots(const fs::path& dir, const std::vector<std::string>& roots) {
  if (roots.empty()) return absl::OkStatus();
  std::vector<fs::path> canonical_roots;
  for (const std::string& root : roots) {
    std::error_code ec;
    fs::path resolved = fs::canonical(root, ec);
    if (!ec) canonical_roots.push_back(std::move(resolved));
  }
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::error_code entry_ec;
    // Follows links; directories and dangling links are never read.
    if (!fs::is_regular_file(entry.path(), entry_ec)) continue;
    const fs::path resolved = fs::canonical(entry.path(), entry_ec);
    const bool inside =
        !entry_ec && std::any_of(canonical_roots.begin(), canonical_roots.end(),
                                 [&](const fs::path& root) { return PathIsUnder(resolved, root); });
    if (!inside) {
      return absl::PermissionDeniedError(
          absl::StrCat("checkpoint file ", entry.path().string(), " resolves to ",
                       resolved.string(), ", outside the allowed model roots"));
    }
  }
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir.string(), ": cannot list the checkpoint directory: ", ec.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<Checkpoint> ReadCheckpoint(
    const fs::path& dir, const CallContext& ctx, const std::vector<std::string>& allowed_roots,
    const std::function<absl::Status(const ModelConfig&)>& before_weights) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir.string(), ": no such checkpoint directory"));
  }
  ICD_RETURN_IF_ERROR(CheckFilesUnderRoots(dir, allowed_roots));
  Checkpoint checkpoint;
  const fs::path config_file = dir / "config.json";
  if (!fs::exists(fs::symlink_status(config_file, ec))) {
    return absl::InvalidArgumentError(absl::StrCat(
        config_file.string(), ": missing; a checkpoint directory needs a config.json"));
  }
  ICD_ASSIGN_OR_RETURN(std::string config_text, ReadText(config_file, kMaxConfigBytes));
  ICD_ASSIGN_OR_RETURN(checkpoint.config, ParseConfig(config_text, config_file.string()));
  const ModelConfig& config = checkpoint.config;
  ICD_ASSIGN_OR_RETURN(checkpoint.layout, FindWeightFiles(dir, config));
  CheckpointLayout& layout = checkpoint.layout;
  if (before_weights) ICD_RETURN_IF_ERROR(before_weights(config));

  Fingerprint fingerprint;
  fingerprint.Add(config_text);
  const auto expected = ExpectedShapes(config);
  std::optional<torch::Tensor> stored_head;
  int64_t files_read = 0;
  for (WeightFile& weight_file : layout.files) {
    ICD_RETURN_IF_ERROR(PollContext(ctx));
    // Progress in weight files (shards): a large checkpoint is many.
    ReportProgress(ctx, "read", files_read++, static_cast<int64_t>(layout.files.size()));
    const fs::path path = dir / weight_file.file;
    if (!fs::is_regular_file(path)) {
      return absl::NotFoundError(absl::StrCat(path.string(), ": missing weights file"));
    }
    absl::StatusOr<io::TensorList> tensors = layout.format == WeightFormat::kSafetensors
                                                 ? io::ReadSafetensors(path)
                                                 : io::ReadTorchBin(path);
    if (!tensors.ok()) return tensors.status();
    for (io::NamedTensor& named : *tensors) {
      weight_file.names.push_back(named.name);
      std::string canonical = CanonicalTensorName(named.name, config);
      if (layout.stored_name.count(canonical) > 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            path.string(), ": tensor '", named.name, "' appears twice in the checkpoint"));
      }
      layout.stored_name[canonical] = named.name;
      if (!named.tensor.is_floating_point()) {
        return absl::InvalidArgumentError(absl::StrCat(
            path.string(), ": tensor '", named.name, "' has non-float dtype ",
            std::string(c10::toString(named.tensor.scalar_type()))));
      }
      fingerprint.Add(named.name);
      torch::Tensor contiguous = named.tensor.contiguous();
      fingerprint.Add(contiguous.data_ptr(), contiguous.nbytes());
      if (canonical == kHeadTensor && config.tied) {
        stored_head = named.tensor;  // the tied head: checked against the embedding below
        continue;
      }
      auto shape = expected.find(canonical);
      if (shape == expected.end()) {
        const std::string why = blocks::WhyUnexpected(config, canonical);
        return absl::InvalidArgumentError(absl::StrCat(
            path.string(), ": unexpected tensor '", named.name, "' for a ",
            std::string(FamilyName(config.family)), " model in the ",
            std::string(LayoutName(config.layout)), " layout",
            why.empty() ? " (another architecture or a hybrid?)" : ": " + why));
      }
      if (named.tensor.sizes().vec() != shape->second) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: tensor '%s' has shape [%s], config.json implies [%s]", path.string(),
            named.name, absl::StrJoin(named.tensor.sizes().vec(), ", "),
            absl::StrJoin(shape->second, ", ")));
      }
      checkpoint.weights[canonical] = std::move(named.tensor);
    }
  }
  for (const auto& [name, shape] : expected) {
    if (checkpoint.weights.count(name) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(dir.string(), ": tensor '", LayoutTensorName(config.layout, name),
                       "' is missing from the checkpoint"));
    }
  }
  if (stored_head) {
    const torch::Tensor& embedding = checkpoint.weights.at(kEmbeddingTensor);
    if (!stored_head->sizes().equals(embedding.sizes()) || !torch::equal(*stored_head, embedding)) {
      return absl::InvalidArgumentError(absl::StrCat(
          dir.string(), ": config ties the head to the embedding, but lm_head.weight differs "
                        "from it"));
    }
  }
  // Names the exporter writes back, including the tied head where the file had it.
  checkpoint.fingerprint = fingerprint.Hex();
  return checkpoint;
}

}  // namespace icd
