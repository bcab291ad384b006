// A restricted unpickler for state dicts. It builds plain values (no Python
// objects, no code): the only callables are an allow-list of globals, each
// interpreted here by name. Everything else is refused before it is used.
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "io/pickle.h"

namespace icd::io {
namespace {

// Nesting deeper than this is refused: destroying a very deep chain of
// shared_ptr values would recurse off the stack, and a state dict needs 4.
constexpr int kMaxDepth = 64;

enum class Kind { kNone, kBool, kInt, kFloat, kString, kTuple, kList, kDict, kGlobal, kStorage, kTensor };

// With its article, for messages ("is an int").
const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kNone: return "None";
    case Kind::kBool: return "a bool";
    case Kind::kInt: return "an int";
    case Kind::kFloat: return "a float";
    case Kind::kString: return "a str";
    case Kind::kTuple: return "a tuple";
    case Kind::kList: return "a list";
    case Kind::kDict: return "a dict";
    case Kind::kGlobal: return "a global";
    case Kind::kStorage: return "a storage";
    case Kind::kTensor: return "a tensor";
  }
  return "?";
}

struct Value;
using ValuePtr = std::shared_ptr<Value>;

struct Value {
  Kind kind = Kind::kNone;
  int64_t integer = 0;  // kInt, kBool
  std::string text;     // kString; kGlobal: "module.name"
  std::vector<ValuePtr> items;                         // kTuple, kList
  std::vector<std::pair<ValuePtr, ValuePtr>> entries;  // kDict, insertion order
  std::unordered_map<std::string, size_t> index;       // kDict: str key -> entry
  torch::Tensor tensor;  // kStorage: the 1-D storage; kTensor
  int depth = 1;
};

const char* const kAllowedCallables[] = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter",
};

bool IsAllowedGlobal(const std::string& qualified) {
  for (const char* allowed : kAllowedCallables) {
    if (qualified == allowed) return true;
  }
  return StorageClassDtype(qualified).has_value();
}

class Unpickler {
 public:
  Unpickler(const std::string& where, const std::string& bytes, const StorageLoader& load_storage)
      : where_(where), bytes_(bytes), load_storage_(load_storage) {}

  // Values can form cycles only through lists and dicts (APPEND/SETITEM of
  // a memoized container into itself); emptying them all frees every cycle.
  ~Unpickler() {
    for (const ValuePtr& container : containers_) {
      container->items.clear();
      container->entries.clear();
    }
  }

  Unpickler(const Unpickler&) = delete;
  Unpickler& operator=(const Unpickler&) = delete;

  absl::StatusOr<ValuePtr> Run() {
    while (true) {
      if (pos_ >= bytes_.size()) return Error("ends without STOP");
      op_pos_ = pos_;
      op_ = static_cast<unsigned char>(bytes_[pos_++]);
      if (op_ == '.') {  // STOP
        if (stack_.size() != 1 || !marks_.empty()) {
          return Error(absl::StrCat("STOP with ", stack_.size(), " values on the stack"));
        }
        return stack_.back();
      }
      absl::Status status = Step();
      if (!status.ok()) return status;
    }
  }

 private:
  ValuePtr New(Kind kind) {
    auto value = std::make_shared<Value>();
    value->kind = kind;
    if (kind == Kind::kList || kind == Kind::kDict) containers_.push_back(value);
    return value;
  }

  absl::Status Error(const std::string& reason) const {
    return absl::InvalidArgumentError(absl::StrFormat("%s: byte %d (opcode 0x%02x): %s", where_, op_pos_, op_, reason));
  }

  absl::Status Need(size_t n) const {
    if (bytes_.size() - pos_ < n) return Error(absl::StrCat("truncated: needs ", n, " more bytes"));
    return absl::OkStatus();
  }

  uint64_t ReadLittleEndian(size_t n) {
    uint64_t value = 0;
    for (size_t i = 0; i < n; ++i) value |= static_cast<uint64_t>(static_cast<unsigned char>(bytes_[pos_ + i])) << (8 * i);
    pos_ += n;
    return value;
  }

  absl::StatusOr<std::string> ReadLine() {
    const size_t newline = bytes_.find('\n', pos_);
    if (newline == std::string::npos) return Error("truncated: missing newline");
    std::string line = bytes_.substr(pos_, newline - pos_);
    pos_ = newline + 1;
    return line;
  }

  absl::Status Push(ValuePtr value) {
    if (value->depth > kMaxDepth) return Error(absl::StrCat("values nested deeper than ", kMaxDepth));
    stack_.push_back(std::move(value));
    return absl::OkStatus();
  }

  absl::StatusOr<ValuePtr> Pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) {
      return Error("pops an empty stack");
    }
    ValuePtr value = std::move(stack_.back());
    stack_.pop_back();
    return value;
  }

  // Everything above the last MARK, which is removed.
  absl::StatusOr<std::vector<ValuePtr>> PopToMark() {
    if (marks_.empty()) return Error("no MARK on the stack");
    const size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(mark)),
                                std::make_move_iterator(stack_.end()));
    stack_.resize(mark);
    return items;
  }

  absl::Status Memoize(uint64_t slot) {
    if (stack_.empty()) return Error("memoizes an empty stack");
    memo_[slot] = stack_.back();
    return absl::OkStatus();
  }

  absl::Status Recall(uint64_t slot) {
    const auto found = memo_.find(slot);
    if (found == memo_.end()) return Error(absl::StrCat("memo slot ", slot, " is empty"));
    return Push(found->second);
  }

  static void NoteChild(Value& parent, const Value& child) {
    parent.depth = std::max(parent.depth, child.depth + 1);
  }

  absl::Status PushTuple(std::vector<ValuePtr> items) {
    ValuePtr tuple = New(Kind::kTuple);
    for (const ValuePtr& item : items) NoteChild(*tuple, *item);
    tuple->items = std::move(items);
    return Push(std::move(tuple));
  }

  absl::Status PushString(size_t length) {
    absl::Status status = Need(length);
    if (!status.ok()) return status;
    ValuePtr value = New(Kind::kString);
    value->text = bytes_.substr(pos_, length);
    pos_ += length;
    return Push(std::move(value));
  }

  absl::Status PushInt(int64_t integer, Kind kind = Kind::kInt) {
    ValuePtr value = New(kind);
    value->integer = integer;
    return Push(std::move(value));
  }

  absl::Status PushGlobal(const std::string& module, const std::string& name) {
    const std::string qualified = absl::StrCat(module, ".", name);
    if (!IsAllowedGlobal(qualified)) {
      return Error(absl::StrCat("global '", qualified,
                                "' is not allowed in a state dict (only collections.OrderedDict, "
                                "torch._utils._rebuild_tensor_v2 and torch storage classes are)"));
    }
    ValuePtr value = New(Kind::kGlobal);
    value->text = qualified;
    return Push(std::move(value));
  }

  absl::Status SetItems(Value& dict, std::vector<ValuePtr> flat) {
    if (dict.kind != Kind::kDict) return Error(absl::StrCat("sets items on ", KindName(dict.kind)));
    if (flat.size() % 2 != 0) return Error("odd number of values for SETITEMS");
    for (size_t i = 0; i < flat.size(); i += 2) {
      ValuePtr& key = flat[i];
      if (key->kind != Kind::kString) {
        return Error(absl::StrCat("dict key is ", KindName(key->kind), ", not a str"));
      }
      NoteChild(dict, *flat[i + 1]);
      const auto [slot, inserted] = dict.index.emplace(key->text, dict.entries.size());
      if (inserted) {
        dict.entries.emplace_back(std::move(key), std::move(flat[i + 1]));
      } else {
        dict.entries[slot->second].second = std::move(flat[i + 1]);
      }
    }
    if (dict.depth > kMaxDepth) return Error(absl::StrCat("values nested deeper than ", kMaxDepth));
    return absl::OkStatus();
  }

  absl::Status Append(Value& list, std::vector<ValuePtr> items) {
    if (list.kind != Kind::kList) return Error(absl::StrCat("appends to ", KindName(list.kind)));
    for (ValuePtr& item : items) {
      NoteChild(list, *item);
      list.items.push_back(std::move(item));
    }
    if (list.depth > kMaxDepth) return Error(absl::StrCat("values nested deeper than ", kMaxDepth));
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<int64_t>> IntTuple(const ValuePtr& value, const char* what) {
    if (value->kind != Kind::kTuple) return Error(absl::StrCat(what, " is ", KindName(value->kind), ", not a tuple"));
    std::vector<int64_t> ints;
    for (const ValuePtr& item : value->items) {
      if (item->kind != Kind::kInt) return Error(absl::StrCat(what, " holds ", KindName(item->kind)));
      ints.push_back(item->integer);
    }
    return ints;
  }

  absl::StatusOr<ValuePtr> PersistentLoad(const ValuePtr& pid) {
    const auto& parts = pid->items;
    if (pid->kind != Kind::kTuple || parts.size() != 5 || parts[0]->kind != Kind::kString ||
        parts[0]->text != "storage" || parts[1]->kind != Kind::kGlobal || parts[2]->kind != Kind::kString ||
        parts[3]->kind != Kind::kString || parts[4]->kind != Kind::kInt) {
      return Error("persistent id is not ('storage', storage class, key, location, numel)");
    }
    const std::optional<torch::ScalarType> dtype = StorageClassDtype(parts[1]->text);
    if (!dtype) return Error(absl::StrCat("'", parts[1]->text, "' is not a storage class"));
    if (parts[4]->integer < 0) return Error(absl::StrCat("storage numel ", parts[4]->integer, " is negative"));
    absl::StatusOr<torch::Tensor> storage = load_storage_(parts[2]->text, *dtype, parts[4]->integer);
    if (!storage.ok()) return storage.status();
    ValuePtr value = New(Kind::kStorage);
    value->text = parts[2]->text;
    value->tensor = *std::move(storage);
    return value;
  }

  // storage[offset] viewed with sizes and strides, bounds checked first so
  // that as_strided never reads outside the storage.
  absl::StatusOr<ValuePtr> RebuildTensor(const std::vector<ValuePtr>& args) {
    if (args[0]->kind != Kind::kStorage) return Error(absl::StrCat("rebuilds a tensor from ", KindName(args[0]->kind)));
    if (args[1]->kind != Kind::kInt) return Error("storage offset is not an int");
    absl::StatusOr<std::vector<int64_t>> sizes = IntTuple(args[2], "size");
    if (!sizes.ok()) return sizes.status();
    absl::StatusOr<std::vector<int64_t>> strides = IntTuple(args[3], "stride");
    if (!strides.ok()) return strides.status();
    const int64_t offset = args[1]->integer;
    const std::string shape =
        absl::StrCat("size (", absl::StrJoin(*sizes, ", "), ") stride (", absl::StrJoin(*strides, ", "), ") offset ", offset);
    if (sizes->size() != strides->size() || offset < 0) return Error(absl::StrCat("bad view: ", shape));
    const torch::Tensor& storage = args[0]->tensor;
    bool empty = false;
    int64_t last = offset;  // largest element index touched
    bool overflow = false;
    for (size_t d = 0; d < sizes->size(); ++d) {
      if ((*sizes)[d] < 0 || (*strides)[d] < 0) return Error(absl::StrCat("bad view: ", shape));
      if ((*sizes)[d] == 0) empty = true;
      int64_t reach = 0;
      overflow = overflow || __builtin_mul_overflow((*sizes)[d] > 0 ? (*sizes)[d] - 1 : 0, (*strides)[d], &reach) ||
                 __builtin_add_overflow(last, reach, &last);
    }
    if (!empty && (overflow || last >= storage.numel())) {
      return Error(absl::StrCat("view ", shape, " reaches past storage '", args[0]->text, "' of ", storage.numel(),
                                " elements"));
    }
    ValuePtr value = New(Kind::kTensor);
    try {
      value->tensor = storage.as_strided(*sizes, *strides, empty ? 0 : offset);
    } catch (const std::exception& e) {
      // The exception's text (LibTorch's carries a backtrace) stays out.
      (void)e;
      return Error(absl::StrCat("cannot view storage '", args[0]->text, "' as ", shape,
                                " with these strides and offset"));
    }
    return value;
  }

  absl::StatusOr<ValuePtr> Call(const Value& callable, const Value& args) {
    if (callable.kind != Kind::kGlobal) return Error(absl::StrCat("calls ", KindName(callable.kind)));
    if (args.kind != Kind::kTuple) return Error(absl::StrCat("calls with ", KindName(args.kind), " as arguments"));
    const std::string& name = callable.text;
    const std::vector<ValuePtr>& a = args.items;
    if (name == "collections.OrderedDict") {
      if (!a.empty()) return Error("collections.OrderedDict called with arguments");
      return New(Kind::kDict);
    }
    if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor") {
      const bool v2 = name == "torch._utils._rebuild_tensor_v2";
      // v2: (storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
      if (v2 ? (a.size() != 6 && a.size() != 7) : a.size() != 4) {
        return Error(absl::StrCat(name, " called with ", a.size(), " arguments"));
      }
      if (v2 && (a[4]->kind != Kind::kBool || a[5]->kind != Kind::kDict || !a[5]->entries.empty())) {
        return Error(absl::StrCat(name, ": requires_grad must be a bool and backward_hooks empty"));
      }
      if (v2 && a.size() == 7 && a[6]->kind != Kind::kNone && a[6]->kind != Kind::kDict) {
        return Error(absl::StrCat(name, ": metadata is ", KindName(a[6]->kind)));
      }
      return RebuildTensor(a);
    }
    if (name == "torch._utils._rebuild_parameter") {  // (data, requires_grad, backward_hooks)
      if (a.size() != 3 || a[0]->kind != Kind::kTensor || a[1]->kind != Kind::kBool || a[2]->kind != Kind::kDict ||
          !a[2]->entries.empty()) {
        return Error("torch._utils._rebuild_parameter needs (tensor, bool, empty hooks)");
      }
      return a[0];
    }
    return Error(absl::StrCat("global '", name, "' cannot be called"));
  }

  absl::Status Step();

  const std::string& where_;
  const std::string& bytes_;
  const StorageLoader& load_storage_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  unsigned op_ = 0;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, ValuePtr> memo_;
  std::vector<ValuePtr> containers_;
};

absl::Status Unpickler::Step() {
  absl::Status status;
  auto need = [&](size_t n) {
    status = Need(n);
    return status.ok();
  };
  switch (op_) {
    case 0x80:  // PROTO
      if (!need(1)) return status;
      if (static_cast<unsigned char>(bytes_[pos_]) > 5) return Error("unknown pickle protocol");
      ++pos_;
      return absl::OkStatus();
    case 0x95:  // FRAME: a length hint only
      if (!need(8)) return status;
      pos_ += 8;
      return absl::OkStatus();
    case 'c': {  // GLOBAL
      absl::StatusOr<std::string> module = ReadLine();
      if (!module.ok()) return module.status();
      absl::StatusOr<std::string> name = ReadLine();
      if (!name.ok()) return name.status();
      return PushGlobal(*module, *name);
    }
    case 0x93: {  // STACK_GLOBAL
      absl::StatusOr<ValuePtr> name = Pop();
      if (!name.ok()) return name.status();
      absl::StatusOr<ValuePtr> module = Pop();
      if (!module.ok()) return module.status();
      if ((*module)->kind != Kind::kString || (*name)->kind != Kind::kString) return Error("STACK_GLOBAL needs two str");
      return PushGlobal((*module)->text, (*name)->text);
    }
    case '(':  // MARK
      marks_.push_back(stack_.size());
      return absl::OkStatus();
    case '}': return Push(New(Kind::kDict));  // EMPTY_DICT
    case ']': return Push(New(Kind::kList));  // EMPTY_LIST
    case ')': return Push(New(Kind::kTuple));  // EMPTY_TUPLE
    case 't': case 'l': case 'd': {  // TUPLE, LIST, DICT
      absl::StatusOr<std::vector<ValuePtr>> items = PopToMark();
      if (!items.ok()) return items.status();
      if (op_ == 't') return PushTuple(*std::move(items));
      ValuePtr container = New(op_ == 'l' ? Kind::kList : Kind::kDict);
      status = op_ == 'l' ? Append(*container, *std::move(items)) : SetItems(*container, *std::move(items));
      if (!status.ok()) return status;
      return Push(std::move(container));
    }
    case 0x85: case 0x86: case 0x87: {  // TUPLE1..3
      const size_t n = op_ - 0x84u;
      std::vector<ValuePtr> items(n);
      for (size_t i = n; i-- > 0;) {
        absl::StatusOr<ValuePtr> item = Pop();
        if (!item.ok()) return item.status();
        items[i] = *std::move(item);
      }
      return PushTuple(std::move(items));
    }
    case 'X': case 0x8c: case 0x8d: {  // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
      const size_t width = op_ == 'X' ? 4 : (op_ == 0x8c ? 1 : 8);
      if (!need(width)) return status;
      return PushString(static_cast<size_t>(ReadLittleEndian(width)));
    }
    case 'J':  // BININT
      if (!need(4)) return status;
      return PushInt(static_cast<int32_t>(static_cast<uint32_t>(ReadLittleEndian(4))));
    case 'K':  // BININT1
      if (!need(1)) return status;
      return PushInt(static_cast<int64_t>(ReadLittleEndian(1)));
    case 'M':  // BININT2
      if (!need(2)) return status;
      return PushInt(static_cast<int64_t>(ReadLittleEndian(2)));
    case 0x8a: {  // LONG1: n-byte two's complement
      if (!need(1)) return status;
      const size_t n = static_cast<unsigned char>(bytes_[pos_++]);
      if (n > 8) return Error(absl::StrCat("LONG1 of ", n, " bytes does not fit 64 bits"));
      if (!need(n)) return status;
      uint64_t raw = ReadLittleEndian(n);
      if (n > 0 && n < 8 && (raw >> (8 * n - 1)) != 0) raw |= ~uint64_t{0} << (8 * n);  // sign-extend
      return PushInt(static_cast<int64_t>(raw));
    }
    case 'G': {  // BINFLOAT: big-endian double
      if (!need(8)) return status;
      pos_ += 8;  // no state dict field needs the value itself
      return Push(New(Kind::kFloat));
    }
    case 0x88: return PushInt(1, Kind::kBool);   // NEWTRUE
    case 0x89: return PushInt(0, Kind::kBool);   // NEWFALSE
    case 'N': return Push(New(Kind::kNone));    // NONE
    case 'q':  // BINPUT
      if (!need(1)) return status;
      return Memoize(ReadLittleEndian(1));
    case 'r':  // LONG_BINPUT
      if (!need(4)) return status;
      return Memoize(ReadLittleEndian(4));
    case 0x94: return Memoize(memo_.size());  // MEMOIZE
    case 'h':  // BINGET
      if (!need(1)) return status;
      return Recall(ReadLittleEndian(1));
    case 'j':  // LONG_BINGET
      if (!need(4)) return status;
      return Recall(ReadLittleEndian(4));
    case 's': case 'u': {  // SETITEM, SETITEMS
      std::vector<ValuePtr> flat;
      if (op_ == 'u') {
        absl::StatusOr<std::vector<ValuePtr>> items = PopToMark();
        if (!items.ok()) return items.status();
        flat = *std::move(items);
      } else {
        absl::StatusOr<ValuePtr> value = Pop();
        if (!value.ok()) return value.status();
        absl::StatusOr<ValuePtr> key = Pop();
        if (!key.ok()) return key.status();
        flat = {*std::move(key), *std::move(value)};
      }
      if (stack_.empty()) return Error("sets items with no dict on the stack");
      return SetItems(*stack_.back(), std::move(flat));
    }
    case 'a': case 'e': {  // APPEND, APPENDS
      std::vector<ValuePtr> items;
      if (op_ == 'e') {
        absl::StatusOr<std::vector<ValuePtr>> popped = PopToMark();
        if (!popped.ok()) return popped.status();
        items = *std::move(popped);
      } else {
        absl::StatusOr<ValuePtr> item = Pop();
        if (!item.ok()) return item.status();
        items.push_back(*std::move(item));
      }
      if (stack_.empty()) return Error("appends with no list on the stack");
      return Append(*stack_.back(), std::move(items));
    }
    case 'R': {  // REDUCE
      absl::StatusOr<ValuePtr> args = Pop();
      if (!args.ok()) return args.status();
      absl::StatusOr<ValuePtr> callable = Pop();
      if (!callable.ok()) return callable.status();
      absl::StatusOr<ValuePtr> result = Call(**callable, **args);
      if (!result.ok()) return result.status();
      return Push(*std::move(result));
    }
    case 'Q': {  // BINPERSID
      absl::StatusOr<ValuePtr> pid = Pop();
      if (!pid.ok()) return pid.status();
      absl::StatusOr<ValuePtr> storage = PersistentLoad(*pid);
      if (!storage.ok()) return storage.status();
      return Push(*std::move(storage));
    }
    case 'b': {  // BUILD: an OrderedDict's __dict__ (state_dict's _metadata)
      absl::StatusOr<ValuePtr> state = Pop();
      if (!state.ok()) return state.status();
      if (stack_.empty() || stack_.back()->kind != Kind::kDict ||
          ((*state)->kind != Kind::kDict && (*state)->kind != Kind::kNone)) {
        return Error("BUILD is allowed only to set an OrderedDict's attributes");
      }
      return absl::OkStatus();  // the attributes (_metadata) are not needed
    }
    default:
      return Error("unsupported pickle opcode");
  }
}

}  // namespace

absl::StatusOr<TensorList> UnpickleStateDict(const std::string& where, const std::string& pickle,
                                             const StorageLoader& load_storage) {
  // The unpickler outlives `result` and the copies below: its destructor
  // breaks cycles only after the tensors have been taken out.
  Unpickler unpickler(where, pickle, load_storage);
  absl::StatusOr<ValuePtr> result = unpickler.Run();
  if (!result.ok()) return result.status();
  const Value& dict = **result;
  if (dict.kind != Kind::kDict) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": holds ", KindName(dict.kind), ", not a state dict"));
  }
  TensorList tensors;
  tensors.reserve(dict.entries.size());
  for (const auto& [key, value] : dict.entries) {
    if (value->kind != Kind::kTensor) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": entry '", key->text, "' is ", KindName(value->kind), ", not a tensor"));
    }
    // A non-contiguous view cannot stay a view of its storage under the
    // "contiguous" contract of TensorList; it loses its tie, if any.
    tensors.push_back(NamedTensor{key->text, value->tensor.is_contiguous() ? value->tensor : value->tensor.contiguous()});
  }
  return tensors;
}

}  // namespace icd::io
