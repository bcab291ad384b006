// torch.save's zip layout: <archive>/data.pkl (the pickled state dict),
// <archive>/data/<key> (one record per storage), <archive>/byteorder and
// <archive>/version. LibTorch's PyTorchStreamReader/Writer handle the zip;
// the pickle is ours (io/pickle.h).
#include "io/torch_bin.h"

#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "icd/core/status_macros.h"
#include "io/pickle.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "storages are read and written in native byte order, which must be little-endian"
#endif

namespace icd::io {
namespace {

// LibTorch errors carry a C++ backtrace in what(); messages keep the reason.
std::string Reason(const std::exception& e) {
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&e)) return torch_error->what_without_backtrace();
  return e.what();
}

std::string RecordText(caffe2::serialize::PyTorchStreamReader& reader, const std::string& name) {
  auto [data, size] = reader.getRecord(name);
  return std::string(static_cast<const char*>(data.get()), size);
}

// The zip's local file header magic; a legacy (pre-1.6) torch.save file
// starts with a pickle instead.
absl::Status CheckZipMagic(const std::string& where, const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  char magic[4] = {};
  in.read(magic, 4);
  if (in.gcount() == 4 && std::memcmp(magic, "PK\x03\x04", 4) == 0) return absl::OkStatus();
  if (in.gcount() >= 1 && magic[0] == '\x80') {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with a "
               "current torch.save or convert it to safetensors"));
  }
  return absl::InvalidArgumentError(absl::StrCat(where, ": not a torch.save zip archive (no zip header)"));
}

// Little-endian fields of the zip format.
uint64_t ReadLittle(const unsigned char* bytes, int width) {
  uint64_t value = 0;
  for (int i = width - 1; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

// Every record the archive's central directory lists claims at most the
// file's own size, compressed and not (torch.save stores its records
// uncompressed). LibTorch's reader allocates a record's claimed size before
// it reads it, so a forged size would otherwise ask for gigabytes before
// failing (found by torch_bin_fuzz: 4 GiB from a 1 KB file). Sizes of
// 0xFFFFFFFF are read from the record's zip64 field. An archive whose
// directory cannot be found is left to LibTorch's reader to refuse.
absl::Status CheckRecordSizes(const std::string& where, const std::filesystem::path& file) {
  std::error_code error;
  const uint64_t file_size = std::filesystem::file_size(file, error);
  if (error) return absl::InvalidArgumentError(absl::StrCat(where, ": ", error.message()));
  std::ifstream in(file, std::ios::binary);
  auto read_at = [&in](uint64_t offset, uint64_t length) {
    std::string bytes(static_cast<size_t>(length), '\0');
    in.clear();
    in.seekg(static_cast<std::streamoff>(offset));
    in.read(bytes.data(), static_cast<std::streamsize>(length));
    bytes.resize(static_cast<size_t>(std::max<std::streamsize>(in.gcount(), 0)));
    return bytes;
  };
  // The end-of-central-directory record: 22 bytes and a comment of up to 64 KiB.
  const uint64_t tail_length = std::min<uint64_t>(file_size, 22 + 65535);
  const std::string tail = read_at(file_size - tail_length, tail_length);
  const auto* t = reinterpret_cast<const unsigned char*>(tail.data());
  int64_t end = -1;
  for (int64_t i = static_cast<int64_t>(tail.size()) - 22; i >= 0; --i) {
    if (ReadLittle(t + i, 4) == 0x06054b50) {
      end = i;
      break;
    }
  }
  if (end < 0) return absl::OkStatus();
  uint64_t directory_size = ReadLittle(t + end + 12, 4);
  uint64_t directory_offset = ReadLittle(t + end + 16, 4);
  // zip64: a locator just before the end record points at the zip64 record.
  // LibTorch's reader (miniz) takes the directory from there whenever both
  // are present, whatever the 32-bit fields say, so this check does too
  // (torch_bin_fuzz: a 4 GiB record hidden behind 32-bit fields that point
  // elsewhere).
  bool zip64 = false;
  if (end >= 20 && ReadLittle(t + end - 20, 4) == 0x07064b50) {
    const std::string record = read_at(ReadLittle(t + end - 12, 8), 56);
    const auto* r = reinterpret_cast<const unsigned char*>(record.data());
    if (record.size() == 56 && ReadLittle(r, 4) == 0x06064b50) {
      directory_size = ReadLittle(r + 40, 8);
      directory_offset = ReadLittle(r + 48, 8);
      zip64 = true;
    }
  }
  if (!zip64 && (ReadLittle(t + end + 10, 2) == 0xffff || directory_size == 0xffffffffu ||
                 directory_offset == 0xffffffffu)) {
    return absl::OkStatus();  // zip64 fields without a zip64 record: LibTorch refuses it
  }
  if (directory_size > file_size || directory_offset > file_size - directory_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": the zip directory (", directory_size, " bytes at ", directory_offset,
        ") lies outside the file's ", file_size, " bytes"));
  }
  const std::string directory = read_at(directory_offset, directory_size);
  const auto* d = reinterpret_cast<const unsigned char*>(directory.data());
  // Every header in the directory's bytes, whatever count the end record
  // claims (a forged count must not hide a forged size from this check).
  uint64_t at = 0;
  while (at + 46 <= directory.size()) {
    if (ReadLittle(d + at, 4) != 0x02014b50) break;  // LibTorch's reader says what is wrong
    uint64_t compressed = ReadLittle(d + at + 20, 4);
    uint64_t size = ReadLittle(d + at + 24, 4);
    const uint64_t name_length = ReadLittle(d + at + 28, 2);
    const uint64_t extra_length = ReadLittle(d + at + 30, 2);
    const uint64_t comment_length = ReadLittle(d + at + 32, 2);
    const uint64_t next = at + 46 + name_length + extra_length + comment_length;
    if (next > directory.size()) break;
    const std::string name(directory, static_cast<size_t>(at + 46), static_cast<size_t>(name_length));
    // zip64 sizes: the extra field of id 1 holds the 8-byte values, the
    // uncompressed size first, of those whose 4-byte field is all ones.
    for (uint64_t e = at + 46 + name_length; e + 4 <= at + 46 + name_length + extra_length;) {
      const uint64_t id = ReadLittle(d + e, 2);
      const uint64_t length = ReadLittle(d + e + 2, 2);
      if (id == 1) {
        uint64_t field = e + 4;
        if (size == 0xffffffffu && field + 8 <= e + 4 + length) {
          size = ReadLittle(d + field, 8);
          field += 8;
        }
        if (compressed == 0xffffffffu && field + 8 <= e + 4 + length) {
          compressed = ReadLittle(d + field, 8);
        }
      }
      e += 4 + length;
    }
    if (size > file_size || compressed > file_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": zip record '", name, "' claims ", size, " bytes (", compressed,
          " stored), more than the file's ", file_size));
    }
    at = next;
  }
  return absl::OkStatus();
}

// Loads each storage record once; every later use of the key gets the same
// tensor, so views of one key share one storage.
class StorageCache {
 public:
  StorageCache(const std::string& where, caffe2::serialize::PyTorchStreamReader& reader)
      : where_(where), reader_(reader) {}

  absl::StatusOr<torch::Tensor> Load(const std::string& key, torch::ScalarType dtype, int64_t numel) {
    const std::string record = absl::StrCat("data/", key);
    const auto cached = storages_.find(key);
    if (cached != storages_.end()) {
      const torch::Tensor& storage = cached->second;
      if (storage.scalar_type() != dtype || storage.numel() != numel) {
        return absl::InvalidArgumentError(absl::StrCat(
            where_, ": storage '", key, "' used as ", c10::toString(dtype), " x ", numel, " and as ",
            c10::toString(storage.scalar_type()), " x ", storage.numel()));
      }
      return storage;
    }
    try {
      if (!reader_.hasRecord(record)) {
        return absl::InvalidArgumentError(absl::StrCat(where_, ": storage '", key, "' has no record ", record));
      }
      auto [data, size] = reader_.getRecord(record);
      const uint64_t expected = static_cast<uint64_t>(numel) * c10::elementSize(dtype);
      if (size != expected) {
        return absl::InvalidArgumentError(absl::StrCat(where_, ": record ", record, " holds ", size,
                                                       " bytes, but storage '", key, "' needs ", numel, " x ",
                                                       c10::toString(dtype), " = ", expected));
      }
      // The tensor owns the record's buffer: no copy.
      c10::Storage bytes(c10::Storage::use_byte_size_t(), size, std::move(data), nullptr, false);
      torch::Tensor storage = torch::empty({0}, torch::TensorOptions().dtype(dtype)).set_(bytes, 0, {numel}, {1});
      storages_.emplace(key, storage);
      return storage;
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(where_, ": cannot read record ", record, ": ", Reason(e)));
    }
  }

 private:
  const std::string& where_;
  caffe2::serialize::PyTorchStreamReader& reader_;
  std::unordered_map<std::string, torch::Tensor> storages_;
};

}  // namespace

absl::StatusOr<TensorList> ReadTorchBin(const std::filesystem::path& file) {
  const std::string where = file.string();
  std::error_code error;
  if (!std::filesystem::exists(file, error)) return absl::NotFoundError(absl::StrCat(where, ": no such file"));
  if (!std::filesystem::is_regular_file(file, error)) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": not a regular file"));
  }
  absl::Status magic = CheckZipMagic(where, file);
  if (!magic.ok()) return magic;
  absl::Status sizes = CheckRecordSizes(where, file);
  if (!sizes.ok()) return sizes;

  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  std::string pickle;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(where);
    if (!reader->hasRecord("data.pkl")) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": archive has no data.pkl"));
    }
    if (reader->hasRecord("byteorder")) {
      const std::string byteorder = RecordText(*reader, "byteorder");
      if (byteorder != "little") {
        return absl::InvalidArgumentError(absl::StrCat(where, ": byteorder '", byteorder, "' is not supported"));
      }
    }
    pickle = RecordText(*reader, "data.pkl");
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": not a readable torch.save archive: ", Reason(e)));
  }
  StorageCache storages(where, *reader);
  const StorageLoader load = [&storages](const std::string& key, torch::ScalarType dtype, int64_t numel) {
    return storages.Load(key, dtype, numel);
  };
  return UnpickleStateDict(absl::StrCat(where, ": data.pkl"), pickle, load);
}

absl::Status WriteTorchBin(const std::filesystem::path& file, const TensorList& tensors) {
  const std::string where = file.string();
  // One storage record per distinct storage, keyed "0", "1", ... in order of
  // first use, as torch.save numbers them.
  struct StorageRecord {
    torch::Tensor bytes;  // 1-D, contiguous, CPU
  };
  std::vector<StorageRecord> records;
  std::map<const void*, size_t> record_of_storage;
  std::map<std::string, int> seen_names;
  std::vector<PickledTensor> pickled;
  pickled.reserve(tensors.size());
  try {
    // Storages used by more than one tensor are written whole (ties keep
    // their offsets); a storage used once is written as that tensor's bytes.
    std::map<const void*, int> uses;
    for (const NamedTensor& named : tensors) {
      if (!named.tensor.defined()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", named.name, "' is undefined"));
      }
      if (seen_names[named.name]++ > 0) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", named.name, "' given twice"));
      }
      ++uses[named.tensor.storage().unsafeGetStorageImpl()];
    }
    for (const NamedTensor& named : tensors) {
      const torch::Tensor& tensor = named.tensor;
      const void* storage_id = tensor.storage().unsafeGetStorageImpl();
      const auto [found, inserted] = record_of_storage.emplace(storage_id, records.size());
      PickledTensor entry;
      entry.name = named.name;
      entry.dtype = tensor.scalar_type();
      entry.storage_key = std::to_string(found->second);
      if (uses[storage_id] > 1) {
        const int64_t storage_numel =
            static_cast<int64_t>(tensor.storage().nbytes() / static_cast<size_t>(tensor.element_size()));
        if (inserted) {
          torch::Tensor whole = torch::empty({0}, tensor.options()).set_(tensor.storage(), 0, {storage_numel}, {1});
          records.push_back(StorageRecord{whole.detach().to(torch::kCPU).contiguous()});
        } else if (records[found->second].bytes.scalar_type() != entry.dtype) {
          return absl::InvalidArgumentError(absl::StrCat(
              where, ": tensor '", named.name, "' shares a storage with a tensor of another dtype"));
        }
        entry.storage_numel = storage_numel;
        entry.storage_offset = tensor.storage_offset();
        entry.sizes = tensor.sizes().vec();
        entry.strides = tensor.strides().vec();
      } else {
        torch::Tensor bytes = tensor.detach().to(torch::kCPU).contiguous();
        entry.storage_numel = bytes.numel();
        entry.sizes = bytes.sizes().vec();
        entry.strides = bytes.strides().vec();
        records.push_back(StorageRecord{bytes.reshape({-1})});
      }
      pickled.push_back(std::move(entry));
    }
  } catch (const std::exception& e) {
    return InternalFailure(absl::StrCat(where, ": gathering tensors"), e.what());
  }
  absl::StatusOr<std::string> pickle = PickleStateDict(pickled);
  if (!pickle.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", pickle.status().message()));

  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat(where, ": cannot open for writing"));
  // The writer never sees a short write (it would throw from its destructor);
  // the stream's state is checked once at the end instead.
  const auto write = [&out](const void* data, size_t size) {
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
    return size;
  };
  try {
    caffe2::serialize::PyTorchStreamWriter writer(write);
    writer.writeRecord("data.pkl", pickle->data(), pickle->size());
    writer.writeRecord("byteorder", "little", 6);
    static const char kEmpty = 0;
    for (size_t i = 0; i < records.size(); ++i) {
      const torch::Tensor& bytes = records[i].bytes;
      const void* data = bytes.numel() > 0 ? bytes.data_ptr() : &kEmpty;
      writer.writeRecord(absl::StrCat("data/", i), data, bytes.nbytes());
    }
    writer.writeEndOfFile();  // adds the "version" record
  } catch (const std::exception& e) {
    return InternalFailure(absl::StrCat(where, ": writing the archive"), e.what());
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(where, ": write failed"));
  return absl::OkStatus();
}

}  // namespace icd::io
