#include "icdctl_readers.h"

#include <cstring>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "icd/status_macros.h"
#include "absl/strings/str_split.h"
#include "icdctl_flags.h"

namespace icd::ctl {

absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, ": cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace {

// Little-endian bytes of one value, whatever the host's byte order.
template <typename T, typename Bits>
T LoadLe(const char* p) {
  Bits bits = 0;
  for (std::size_t b = 0; b < sizeof(Bits); ++b) {
    bits |= static_cast<Bits>(static_cast<unsigned char>(p[b])) << (8 * b);
  }
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// The header of a .npy file (NumPy format 1.0 to 3.0): the element type
// ("descr"), the order and the shape; `data_offset` is where the data start.
struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  int64_t data_offset = 0;
};

constexpr char kNpyMagic[] = "\x93NUMPY";

bool IsNpy(std::istream& in) {
  char magic[6] = {};
  in.seekg(0);
  in.read(magic, 6);
  const bool yes = in.gcount() == 6 && std::memcmp(magic, kNpyMagic, 6) == 0;
  in.clear();
  in.seekg(0);
  return yes;
}

// Parses the Python-literal dict of a .npy header, e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (1000, 128), }
absl::StatusOr<NpyHeader> ReadNpyHeader(std::istream& in, const std::string& path) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a readable .npy file: ", why));
  };
  char prefix[8] = {};
  in.seekg(0);
  in.read(prefix, 8);
  if (in.gcount() != 8 || std::memcmp(prefix, kNpyMagic, 6) != 0) return bad("no \\x93NUMPY magic");
  const int major = static_cast<unsigned char>(prefix[6]);
  if (major < 1 || major > 3) return bad(absl::StrCat("format version ", major, " is unknown"));
  const int len_bytes = major == 1 ? 2 : 4;
  char len_raw[4] = {};
  in.read(len_raw, len_bytes);
  if (in.gcount() != len_bytes) return bad("truncated header");
  const int64_t header_len = major == 1 ? LoadLe<uint16_t, uint16_t>(len_raw)
                                        : LoadLe<uint32_t, uint32_t>(len_raw);
  std::string dict(static_cast<std::size_t>(header_len), '\0');
  in.read(dict.data(), header_len);
  if (in.gcount() != header_len) return bad("truncated header");
  NpyHeader out;
  out.data_offset = 8 + len_bytes + header_len;

  // The value after 'key': (up to the next top-level comma or brace).
  auto value_of = [&](const std::string& key) -> absl::StatusOr<std::string> {
    std::size_t at = dict.find("'" + key + "'");
    if (at == std::string::npos) at = dict.find("\"" + key + "\"");
    if (at == std::string::npos) return bad(absl::StrCat("no '", key, "' in the header"));
    std::size_t pos = dict.find(':', at + key.size() + 2);
    if (pos == std::string::npos) return bad(absl::StrCat("no value for '", key, "'"));
    ++pos;
    while (pos < dict.size() && dict[pos] == ' ') ++pos;
    std::size_t end = pos;
    if (pos < dict.size() && dict[pos] == '(') {
      end = dict.find(')', pos);
      if (end == std::string::npos) return bad("unclosed shape tuple");
      return dict.substr(pos + 1, end - pos - 1);
    }
    if (pos < dict.size() && (dict[pos] == '\'' || dict[pos] == '"')) {
      end = dict.find(dict[pos], pos + 1);
      if (end == std::string::npos) return bad(absl::StrCat("unclosed string for '", key, "'"));
      return dict.substr(pos + 1, end - pos - 1);
    }
    while (end < dict.size() && dict[end] != ',' && dict[end] != '}') ++end;
    std::string v = dict.substr(pos, end - pos);
    while (!v.empty() && v.back() == ' ') v.pop_back();
    return v;
  };
  ICD_ASSIGN_OR_RETURN(auto descr, value_of("descr"));
  out.descr = descr;
  ICD_ASSIGN_OR_RETURN(auto fortran, value_of("fortran_order"));
  if (fortran != "True" && fortran != "False") {
    return bad(absl::StrCat("fortran_order is '", fortran, "'"));
  }
  out.fortran_order = fortran == "True";
  ICD_ASSIGN_OR_RETURN(auto shape, value_of("shape"));
  for (const auto& dim : absl::StrSplit(shape, ',', absl::SkipWhitespace())) {
    std::string d(dim);
    d.erase(std::remove(d.begin(), d.end(), ' '), d.end());
    auto v = ParseInt("shape", d);
    if (!v.ok() || *v < 0) return bad(absl::StrCat("shape (", shape, ")"));
    out.shape.push_back(*v);
  }
  return out;
}

int64_t FileSize(std::istream& in) {
  in.clear();
  in.seekg(0, std::ios::end);
  const auto size = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  return size;
}

// A trace file opened for streaming: [rows, channels] of float32 or float64,

}  // namespace

absl::StatusOr<std::unique_ptr<TraceFile>> TraceFile::Open(const std::string& path,
                                                         int64_t channels_flag) {
  auto file = std::unique_ptr<TraceFile>(new TraceFile());
  file->in_.open(path, std::ios::binary);
  if (!file->in_) return absl::NotFoundError(absl::StrCat("--traces: cannot read ", path));
  const int64_t size = FileSize(file->in_);
  if (IsNpy(file->in_)) {
    ICD_ASSIGN_OR_RETURN(auto header, ReadNpyHeader(file->in_, path));
    if (header.descr == "<f4") {
      file->item_bytes_ = 4;
    } else if (header.descr == "<f8") {
      file->item_bytes_ = 8;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": dtype '", header.descr, "' is not supported; traces are little-endian "
          "float32 ('<f4') or float64 ('<f8'): save a.astype(np.float32)"));
    }
    if (header.fortran_order) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": Fortran-ordered array; save np.ascontiguousarray(a) (C order, one row "
          "per token)"));
    }
    if (header.shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": shape has ", header.shape.size(), " dimensions; traces are 2-D "
          "[rows, channels] (reshape to (-1, channels))"));
    }
    file->rows_ = header.shape[0];
    file->channels_ = header.shape[1];
    if (channels_flag > 0 && channels_flag != file->channels_) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": shape (", file->rows_, ", ", file->channels_, ") but --channels ",
          channels_flag));
    }
    const int64_t want = header.data_offset + file->rows_ * file->channels_ * file->item_bytes_;
    if (size != want) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": ", size, " bytes, but the header's shape and dtype need ", want));
    }
    file->in_.seekg(header.data_offset);
  } else {
    if (channels_flag <= 0) {
      return Usage(absl::StrCat("--traces ", path, " is not a .npy file: give --channels C "
                                "to read it as raw little-endian float32 [rows, C]"));
    }
    file->channels_ = channels_flag;
    if (size % (4 * channels_flag) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": ", size, " bytes are not whole rows of ", channels_flag,
          " float32 channels (", 4 * channels_flag, " bytes each)"));
    }
    file->rows_ = size / (4 * channels_flag);
  }
  if (file->rows_ == 0 || file->channels_ == 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no trace rows"));
  }
  return file;
}

absl::StatusOr<int64_t> TraceFile::Next(int64_t max_rows, std::vector<float>& out) {
  const int64_t n = std::min(max_rows, rows_ - read_);
  if (n <= 0) return 0;
  buffer_.resize(static_cast<std::size_t>(n * channels_ * item_bytes_));
  in_.read(buffer_.data(), static_cast<std::streamsize>(buffer_.size()));
  if (in_.gcount() != static_cast<std::streamsize>(buffer_.size())) {
    return absl::DataLossError(absl::StrCat("--traces: short read at row ", read_));
  }
  const std::size_t values = static_cast<std::size_t>(n * channels_);
  out.resize(values);
  for (std::size_t i = 0; i < values; ++i) {
    const char* p = buffer_.data() + i * static_cast<std::size_t>(item_bytes_);
    out[i] = item_bytes_ == 4 ? LoadLe<float, uint32_t>(p)
                              : static_cast<float>(LoadLe<double, uint64_t>(p));
  }
  read_ += n;
  return n;
}

absl::StatusOr<TokenIds> ReadTokenFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  TokenIds out;
  if (IsNpy(in)) {
    ICD_ASSIGN_OR_RETURN(auto header, ReadNpyHeader(in, path));
    int item = 0;
    if (header.descr == "<i8") item = 8;
    if (header.descr == "<i4") item = 4;
    if (item == 0 || header.fortran_order || header.shape.empty() || header.shape.size() > 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": token ids are a C-order 1-D or 2-D int64 ('<i8') or int32 ('<i4') array; "
          "got descr '", header.descr, "', ", header.shape.size(), " dimensions"));
    }
    int64_t count = 1;
    for (int64_t d : header.shape) count *= d;
    std::string raw(static_cast<std::size_t>(count * item), '\0');
    in.seekg(header.data_offset);
    in.read(raw.data(), static_cast<std::streamsize>(raw.size()));
    if (in.gcount() != static_cast<std::streamsize>(raw.size())) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": shorter than its shape"));
    }
    for (int64_t i = 0; i < count; ++i) {
      const char* p = raw.data() + i * item;
      out.ids.push_back(item == 8 ? LoadLe<int64_t, uint64_t>(p)
                                  : static_cast<int64_t>(LoadLe<int32_t, uint32_t>(p)));
    }
    if (header.shape.size() == 2) out.batch = header.shape[0];
    return out;
  }
  std::stringstream text;
  text << in.rdbuf();
  std::string all = text.str();
  std::replace(all.begin(), all.end(), ',', ' ');
  for (const auto& word : absl::StrSplit(all, absl::ByAnyChar(" \t\r\n"), absl::SkipEmpty())) {
    ICD_ASSIGN_OR_RETURN(auto v, ParseInt(absl::StrCat(flag, " ", path), std::string(word)));
    out.ids.push_back(v);
  }
  return out;
}

}  // namespace icd::ctl
