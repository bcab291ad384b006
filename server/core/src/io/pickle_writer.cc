// Writes a state dict pickle the way torch.save lays it out (protocol 2), so
// that torch.load(weights_only=True) accepts it: only collections.OrderedDict,
// torch._utils._rebuild_tensor_v2 and typed storage classes appear.
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "io/pickle.h"

namespace icd::io {
namespace {

struct StorageClass {
  torch::ScalarType dtype;
  const char* name;
};

// The legacy typed-storage classes that torch.save names in persistent ids
// (also in PyTorch 2.x) and that the weights-only unpickler allows.
constexpr StorageClass kStorageClasses[] = {
    {torch::kFloat, "FloatStorage"},   {torch::kDouble, "DoubleStorage"},
    {torch::kHalf, "HalfStorage"},     {torch::kBFloat16, "BFloat16Storage"},
    {torch::kLong, "LongStorage"},     {torch::kInt, "IntStorage"},
    {torch::kShort, "ShortStorage"},   {torch::kChar, "CharStorage"},
    {torch::kByte, "ByteStorage"},     {torch::kBool, "BoolStorage"},
};

// Protocol-2 opcodes used below.
constexpr char kProto = '\x80';
constexpr char kGlobal = 'c';
constexpr char kEmptyTuple = ')';
constexpr char kMark = '(';
constexpr char kTuple = 't';
constexpr char kTuple1 = '\x85';
constexpr char kTuple2 = '\x86';
constexpr char kTuple3 = '\x87';
constexpr char kReduce = 'R';
constexpr char kBinPersId = 'Q';
constexpr char kBinUnicode = 'X';
constexpr char kBinInt = 'J';
constexpr char kBinInt1 = 'K';
constexpr char kBinInt2 = 'M';
constexpr char kLong1 = '\x8a';
constexpr char kNewFalse = '\x89';
constexpr char kSetItems = 'u';
constexpr char kBinPut = 'q';
constexpr char kLongBinPut = 'r';
constexpr char kBinGet = 'h';
constexpr char kLongBinGet = 'j';
constexpr char kStop = '.';

class PickleBuilder {
 public:
  std::string& bytes() { return bytes_; }

  void Op(char opcode) { bytes_.push_back(opcode); }

  void LittleEndian(uint64_t value, int width) {
    for (int i = 0; i < width; ++i) {
      bytes_.push_back(static_cast<char>(value & 0xFF));
      value >>= 8;
    }
  }

  // The smallest encoding Python's pickler would pick.
  void Int(int64_t value) {
    if (value >= 0 && value < 0x100) {
      Op(kBinInt1);
      LittleEndian(static_cast<uint64_t>(value), 1);
    } else if (value >= 0 && value < 0x10000) {
      Op(kBinInt2);
      LittleEndian(static_cast<uint64_t>(value), 2);
    } else if (value >= std::numeric_limits<int32_t>::min() && value <= std::numeric_limits<int32_t>::max()) {
      Op(kBinInt);
      LittleEndian(static_cast<uint64_t>(static_cast<uint32_t>(static_cast<int32_t>(value))), 4);
    } else {
      // LONG1: minimal two's complement, little-endian.
      int width = 8;
      while (width > 1) {
        const int64_t shifted = value >> (8 * (width - 1) - 1);
        if (shifted != 0 && shifted != -1) break;
        --width;
      }
      Op(kLong1);
      bytes_.push_back(static_cast<char>(width));
      LittleEndian(static_cast<uint64_t>(value), width);
    }
  }

  void String(const std::string& text) {
    Op(kBinUnicode);
    LittleEndian(text.size(), 4);
    bytes_ += text;
  }

  // Emits a global once, then fetches it from the memo like Python does.
  void Global(const std::string& module, const std::string& name) {
    const std::string qualified = absl::StrCat(module, "\n", name, "\n");
    for (const auto& [known, slot] : memo_) {
      if (known == qualified) {
        Get(slot);
        return;
      }
    }
    Op(kGlobal);
    bytes_ += qualified;
    const uint32_t slot = next_slot_++;
    if (slot < 0x100) {
      Op(kBinPut);
      LittleEndian(slot, 1);
    } else {
      Op(kLongBinPut);
      LittleEndian(slot, 4);
    }
    memo_.emplace_back(qualified, slot);
  }

  void IntTuple(const std::vector<int64_t>& values) {
    if (values.empty()) {
      Op(kEmptyTuple);
      return;
    }
    if (values.size() > 3) Op(kMark);
    for (int64_t value : values) Int(value);
    switch (values.size()) {
      case 1: Op(kTuple1); break;
      case 2: Op(kTuple2); break;
      case 3: Op(kTuple3); break;
      default: Op(kTuple); break;
    }
  }

  void EmptyOrderedDict() {
    Global("collections", "OrderedDict");
    Op(kEmptyTuple);
    Op(kReduce);
  }

 private:
  void Get(uint32_t slot) {
    if (slot < 0x100) {
      Op(kBinGet);
      LittleEndian(slot, 1);
    } else {
      Op(kLongBinGet);
      LittleEndian(slot, 4);
    }
  }

  std::string bytes_;
  std::vector<std::pair<std::string, uint32_t>> memo_;
  uint32_t next_slot_ = 0;
};

}  // namespace

std::optional<std::string> StorageClassName(torch::ScalarType dtype) {
  for (const StorageClass& storage_class : kStorageClasses) {
    if (storage_class.dtype == dtype) return std::string(storage_class.name);
  }
  return std::nullopt;
}

std::optional<torch::ScalarType> StorageClassDtype(const std::string& qualified_name) {
  for (const StorageClass& storage_class : kStorageClasses) {
    if (qualified_name == absl::StrCat("torch.", storage_class.name)) return storage_class.dtype;
  }
  if (qualified_name == "torch.UntypedStorage" || qualified_name == "torch.storage.UntypedStorage") {
    return torch::kByte;
  }
  return std::nullopt;
}

absl::StatusOr<std::string> PickleStateDict(const std::vector<PickledTensor>& tensors) {
  PickleBuilder out;
  out.Op(kProto);
  out.bytes().push_back('\x02');
  out.EmptyOrderedDict();
  if (!tensors.empty()) out.Op(kMark);
  for (const PickledTensor& tensor : tensors) {
    const std::optional<std::string> storage_class = StorageClassName(tensor.dtype);
    if (!storage_class) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor.name, "': dtype ",
                                                     c10::toString(tensor.dtype), " has no torch storage class"));
    }
    out.String(tensor.name);
    // _rebuild_tensor_v2(storage, storage_offset, size, stride,
    //                    requires_grad, backward_hooks)
    out.Global("torch._utils", "_rebuild_tensor_v2");
    out.Op(kMark);
    out.Op(kMark);
    out.String("storage");
    out.Global("torch", *storage_class);
    out.String(tensor.storage_key);
    out.String("cpu");
    out.Int(tensor.storage_numel);
    out.Op(kTuple);
    out.Op(kBinPersId);
    out.Int(tensor.storage_offset);
    out.IntTuple(tensor.sizes);
    out.IntTuple(tensor.strides);
    out.Op(kNewFalse);
    out.EmptyOrderedDict();
    out.Op(kTuple);
    out.Op(kReduce);
  }
  if (!tensors.empty()) out.Op(kSetItems);
  out.Op(kStop);
  return std::move(out.bytes());
}

}  // namespace icd::io
