// Strict safetensors reader and writer (format: 8-byte little-endian header
// length, a JSON header, then the raw little-endian tensor bytes).
#include "io/safetensors.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "icd/core/status_macros.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader copies bytes as they are"
#endif

namespace icd::io {
namespace {

using Json = nlohmann::json;

// A header larger than this is refused before allocating for it (the
// reference implementation uses the same bound).
constexpr uint64_t kMaxHeaderBytes = 100ULL * 1000 * 1000;
constexpr char kMetadataKey[] = "__metadata__";

struct DtypeInfo {
  const char* name;
  torch::ScalarType type;
  uint64_t itemsize;
};

constexpr DtypeInfo kDtypes[] = {
    {"F64", torch::kDouble, 8},   {"F32", torch::kFloat, 4},
    {"F16", torch::kHalf, 2},     {"BF16", torch::kBFloat16, 2},
    {"I64", torch::kLong, 8},     {"I32", torch::kInt, 4},
    {"I16", torch::kShort, 2},    {"I8", torch::kChar, 1},
    {"U8", torch::kByte, 1},      {"BOOL", torch::kBool, 1},
};

const DtypeInfo* DtypeByName(const std::string& name) {
  for (const DtypeInfo& info : kDtypes) {
    if (name == info.name) return &info;
  }
  return nullptr;
}

const DtypeInfo* DtypeByType(torch::ScalarType type) {
  for (const DtypeInfo& info : kDtypes) {
    if (type == info.type) return &info;
  }
  return nullptr;
}

// One validated header entry.
struct Entry {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Reads a JSON integer that must be >= 0 and fit in int64 (sizes and
// offsets are used as int64 by LibTorch).
std::optional<uint64_t> NonNegativeInt(const Json& value) {
  if (value.is_number_unsigned()) {
    const auto v = value.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return v;
  }
  if (value.is_number_integer()) {
    const auto v = value.get<int64_t>();
    if (v < 0) return std::nullopt;
    return static_cast<uint64_t>(v);
  }
  return std::nullopt;
}

absl::StatusOr<Entry> ParseEntry(const std::string& where, const std::string& name,
                                 const Json& value, uint64_t data_bytes) {
  const std::string prefix = absl::StrCat(where, ": tensor '", name, "': ");
  if (!value.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "entry is a JSON ", value.type_name(), ", not an object"));
  }
  for (auto field = value.begin(); field != value.end(); ++field) {
    if (field.key() != "dtype" && field.key() != "shape" && field.key() != "data_offsets") {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "unknown field '", field.key(), "'"));
    }
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(field)) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "missing field '", field, "'"));
    }
  }
  Entry entry;
  entry.name = name;

  const Json& dtype = value.at("dtype");
  if (!dtype.is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "dtype is ", dtype.dump(), ", not a string"));
  }
  entry.dtype = DtypeByName(dtype.get<std::string>());
  if (entry.dtype == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, "unknown dtype '", dtype.get<std::string>(),
        "' (known: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)"));
  }

  const Json& shape = value.at("shape");
  if (!shape.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "shape is ", shape.dump(), ", not an array"));
  }
  // numel * itemsize in unsigned 64-bit with overflow checks: a hostile shape
  // must not wrap around to a small byte count.
  uint64_t nbytes = entry.dtype->itemsize;
  bool overflow = false;
  for (const Json& dim : shape) {
    const std::optional<uint64_t> size = NonNegativeInt(dim);
    if (!size) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "shape ", shape.dump(), " has a dimension that is not a non-negative integer"));
    }
    entry.shape.push_back(static_cast<int64_t>(*size));
    overflow = overflow || __builtin_mul_overflow(nbytes, *size, &nbytes);
  }

  const Json& offsets = value.at("data_offsets");
  std::optional<uint64_t> begin;
  std::optional<uint64_t> end;
  if (offsets.is_array() && offsets.size() == 2) {
    begin = NonNegativeInt(offsets[0]);
    end = NonNegativeInt(offsets[1]);
  }
  if (!begin || !end || *begin > *end) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, "data_offsets ", offsets.dump(), " is not [begin, end] with 0 <= begin <= end"));
  }
  entry.begin = *begin;
  entry.end = *end;
  if (overflow || nbytes != entry.end - entry.begin) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, "shape ", ShapeText(entry.shape), " of ", entry.dtype->name, " needs ",
        overflow ? std::string("more than 2^64") : absl::StrCat(nbytes), " bytes but data_offsets [",
        entry.begin, ", ", entry.end, "] hold ", entry.end - entry.begin));
  }
  if (entry.end > data_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "data_offsets [", entry.begin, ", ", entry.end,
                                                   "] past the end of the data (", data_bytes, " bytes)"));
  }
  return entry;
}

absl::Status CheckMetadata(const std::string& where, const Json& metadata) {
  if (!metadata.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": __metadata__ is a JSON ", metadata.type_name(), ", not an object"));
  }
  for (const auto& [key, value] : metadata.items()) {
    if (!value.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": __metadata__ '", key, "' is ",
                                                     value.dump(), ", not a string"));
    }
  }
  return absl::OkStatus();
}

// Parses the JSON header; duplicate top-level keys are refused (a JSON
// object would silently keep the last one).
absl::StatusOr<Json> ParseHeader(const std::string& where, const std::string& text) {
  std::set<std::string> seen;
  std::string duplicate;
  const Json::parser_callback_t note_duplicates = [&](int depth, Json::parse_event_t event, Json& parsed) {
    if (depth == 1 && event == Json::parse_event_t::key && parsed.is_string()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  Json header;
  try {
    header = Json::parse(text, note_duplicates);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": header is a JSON ", header.type_name(), ", not an object"));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": header names '", duplicate, "' twice"));
  }
  return header;
}

}  // namespace

absl::StatusOr<TensorList> ReadSafetensors(const std::filesystem::path& file) {
  const std::string where = file.string();
  std::error_code error;
  if (!std::filesystem::exists(file, error)) {
    return absl::NotFoundError(absl::StrCat(where, ": no such file"));
  }
  if (!std::filesystem::is_regular_file(file, error)) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": not a regular file"));
  }
  const uint64_t file_bytes = std::filesystem::file_size(file, error);
  if (error) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": cannot stat: ", error.message()));
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(where, ": cannot open for reading"));
  if (file_bytes < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": file is ", file_bytes, " bytes, shorter than the 8-byte header length"));
  }
  unsigned char length_bytes[8];
  in.read(reinterpret_cast<char*>(length_bytes), 8);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | length_bytes[i];
  if (header_bytes > file_bytes - 8) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": header length ", header_bytes,
                                                   " past the end of the file (", file_bytes, " bytes)"));
  }
  if (header_bytes > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": header length ", header_bytes, " over the limit of ", kMaxHeaderBytes, " bytes"));
  }
  std::string text(static_cast<size_t>(header_bytes), ' ');
  in.read(text.data(), static_cast<std::streamsize>(header_bytes));
  if (!in) return absl::InvalidArgumentError(absl::StrCat(where, ": read failed in the header"));

  Json header;
  {
    absl::StatusOr<Json> parsed = ParseHeader(where, text);
    if (!parsed.ok()) return parsed.status();
    header = *std::move(parsed);
  }
  const uint64_t data_start = 8 + header_bytes;
  const uint64_t data_bytes = file_bytes - data_start;
  std::vector<Entry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      absl::Status status = CheckMetadata(where, value);
      if (!status.ok()) return status;
      continue;
    }
    absl::StatusOr<Entry> entry = ParseEntry(where, key, value, data_bytes);
    if (!entry.ok()) return entry.status();
    entries.push_back(*std::move(entry));
  }
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // Empty tensors occupy no bytes, so they cannot overlap anything.
  const Entry* previous = nullptr;
  for (const Entry& entry : entries) {
    if (entry.begin == entry.end) continue;
    if (previous != nullptr && entry.begin < previous->end) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": tensor '", entry.name, "' data_offsets [", entry.begin, ", ", entry.end,
          "] overlap tensor '", previous->name, "' data_offsets [", previous->begin, ", ", previous->end, "]"));
    }
    previous = &entry;
  }

  TensorList result;
  result.reserve(entries.size());
  for (const Entry& entry : entries) {
    torch::Tensor tensor;
    try {
      tensor = torch::empty(entry.shape, torch::TensorOptions().dtype(entry.dtype->type));
    } catch (const std::exception& e) {
      return InternalFailure(absl::StrCat(where, ": allocating tensor '", entry.name, "'"),
                             e.what());
    }
    const uint64_t nbytes = entry.end - entry.begin;
    if (nbytes > 0) {
      in.seekg(static_cast<std::streamoff>(data_start + entry.begin));
      in.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(nbytes));
      if (!in) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", entry.name, "': read failed"));
      }
    }
    // Bytes other than 0 and 1 are not valid bools; LibTorch would
    // misbehave on them rather than report.
    if (entry.dtype->type == torch::kBool) {
      const auto* bytes = static_cast<const unsigned char*>(tensor.data_ptr());
      for (uint64_t i = 0; i < nbytes; ++i) {
        if (bytes[i] > 1) {
          return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", entry.name, "': BOOL byte ",
                                                         i, " is ", static_cast<int>(bytes[i])));
        }
      }
    }
    result.push_back(NamedTensor{entry.name, std::move(tensor)});
  }
  return result;
}

absl::Status WriteSafetensors(const std::filesystem::path& file, const TensorList& tensors,
                              const std::map<std::string, std::string>& metadata) {
  const std::string where = file.string();
  Json header = Json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::vector<torch::Tensor> payload;
  payload.reserve(tensors.size());
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const NamedTensor& named : tensors) {
    const std::string prefix = absl::StrCat(where, ": tensor '", named.name, "': ");
    if (named.name.empty() || named.name == kMetadataKey) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "name not allowed in safetensors"));
    }
    if (!names.insert(named.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "name given twice"));
    }
    if (!named.tensor.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "tensor is undefined"));
    }
    const DtypeInfo* dtype = DtypeByType(named.tensor.scalar_type());
    if (dtype == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "dtype ", c10::toString(named.tensor.scalar_type()), " has no safetensors name"));
    }
    torch::Tensor bytes;
    try {
      bytes = named.tensor.detach().to(torch::kCPU).contiguous();
    } catch (const std::exception& e) {
      return InternalFailure(absl::StrCat(prefix, "copying to the CPU"), e.what());
    }
    const uint64_t nbytes = static_cast<uint64_t>(bytes.numel()) * dtype->itemsize;
    header[named.name] = Json{{"dtype", dtype->name},
                              {"shape", bytes.sizes().vec()},
                              {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    payload.push_back(std::move(bytes));
  }
  std::string text;
  try {
    text = header.dump();  // compact, keys sorted (nlohmann::json's std::map)
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": cannot encode the header: ", e.what()));
  }
  // Pad so the data area starts 8-byte aligned, as the reference writer does.
  text.append((8 - text.size() % 8) % 8, ' ');

  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat(where, ": cannot open for writing"));
  char length_bytes[8];
  uint64_t length = text.size();
  for (char& byte : length_bytes) {
    byte = static_cast<char>(length & 0xFF);
    length >>= 8;
  }
  out.write(length_bytes, 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const torch::Tensor& bytes : payload) {
    if (bytes.numel() == 0) continue;
    out.write(static_cast<const char*>(bytes.data_ptr()), static_cast<std::streamsize>(bytes.nbytes()));
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(where, ": write failed"));
  return absl::OkStatus();
}

}  // namespace icd::io
