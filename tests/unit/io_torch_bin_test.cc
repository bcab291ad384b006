// io::ReadTorchBin / WriteTorchBin and the restricted unpickler: the real
// mamba_ssm fixtures, round trips that keep ties, refusals, and PyTorch
// itself (the system interpreter) as the oracle in both directions.
#include "io/torch_bin.h"

#include <caffe2/serialize/inline_container.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "io/pickle.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace icd::io {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::filesystem::path kGolden = std::filesystem::path(ICD_FIXTURES_DIR) / "golden";

class TorchBinTest : public ::testing::Test {
 protected:
  // A torch.save-style zip whose data.pkl is `pickle` (and no storages).
  std::filesystem::path WriteArchive(const std::string& pickle) {
    const std::filesystem::path path = temp_.path() / "crafted.bin";
    caffe2::serialize::PyTorchStreamWriter writer(path.string());
    writer.writeRecord("data.pkl", pickle.data(), pickle.size());
    writer.writeEndOfFile();
    return path;
  }

  // Runs `script` with the system interpreter; returns exit code and stdout.
  std::pair<int, std::string> RunPython(const std::string& script, const std::string& arg) {
    const std::filesystem::path script_path = temp_.path() / "check.py";
    std::ofstream(script_path) << script;
    const std::string command =
        std::string(ICD_SYSTEM_PYTHON) + " " + script_path.string() + " " + arg + " 2>&1";
    FILE* pipe = popen(command.c_str(), "r");
    std::string output;
    std::array<char, 4096> buffer;
    size_t n = 0;
    while (pipe != nullptr && (n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) output.append(buffer.data(), n);
    const int status = pipe == nullptr ? -1 : pclose(pipe);
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
  }

  testing::TempDir temp_;
};

// A byte string from a literal that may hold NULs.
template <size_t N>
std::string Bytes(const char (&text)[N]) {
  return std::string(text, N - 1);
}

bool SameStorage(const torch::Tensor& a, const torch::Tensor& b) {
  return a.storage().unsafeGetStorageImpl() == b.storage().unsafeGetStorageImpl();
}

std::map<std::string, torch::Tensor> ByName(const TensorList& tensors) {
  std::map<std::string, torch::Tensor> by_name;
  for (const NamedTensor& named : tensors) by_name[named.name] = named.tensor;
  return by_name;
}

// mamba_ssm names -> HF names: only the embedding differs; lm_head is tied
// to the embedding (HF's safetensors stores it once).
void ExpectFixtureMatchesHf(const std::string& model, size_t tensor_count) {
  const absl::StatusOr<TensorList> bin = ReadTorchBin(kGolden / model / "mamba_ssm/pytorch_model.bin");
  ASSERT_TRUE(bin.ok()) << bin.status();
  const absl::StatusOr<TensorList> hf = ReadSafetensors(kGolden / model / "hf/model.safetensors");
  ASSERT_TRUE(hf.ok()) << hf.status();
  ASSERT_EQ(bin->size(), tensor_count);
  EXPECT_EQ(bin->front().name, "backbone.embedding.weight");  // dict order
  EXPECT_EQ(bin->back().name, "lm_head.weight");
  const auto hf_by_name = ByName(*hf);
  const auto bin_by_name = ByName(*bin);
  for (const NamedTensor& named : *bin) {
    std::string hf_name = named.name;
    if (hf_name == "backbone.embedding.weight" || hf_name == "lm_head.weight") hf_name = "backbone.embeddings.weight";
    ASSERT_EQ(hf_by_name.count(hf_name), 1u) << named.name;
    EXPECT_TRUE(named.tensor.is_contiguous()) << named.name;
    EXPECT_TRUE(torch::equal(named.tensor, hf_by_name.at(hf_name))) << named.name;
  }
  const torch::Tensor& embedding = bin_by_name.at("backbone.embedding.weight");
  const torch::Tensor& head = bin_by_name.at("lm_head.weight");
  EXPECT_EQ(embedding.data_ptr(), head.data_ptr());
  EXPECT_TRUE(SameStorage(embedding, head));
  EXPECT_FALSE(SameStorage(embedding, bin_by_name.at("backbone.norm_f.weight")));
}

TEST_F(TorchBinTest, ReadsMamba1FixtureTiedAndEqualToHf) { ExpectFixtureMatchesHf("mamba1-small", 23); }

TEST_F(TorchBinTest, ReadsMamba2FixtureTiedAndEqualToHf) { ExpectFixtureMatchesHf("mamba2-one-group", 21); }

// Two names for one tensor, two overlapping views of one storage, every
// written dtype, a 0-dim tensor.
TensorList TiedSample() {
  const torch::Tensor embedding = torch::arange(12, torch::kFloat).reshape({4, 3}) / 8;
  const torch::Tensor base = torch::arange(10, torch::kFloat) - 4;
  return {{"emb.weight", embedding},
          {"head.weight", embedding},
          {"d", torch::tensor({0.1, -2.5}, torch::kDouble)},
          {"h", (torch::arange(3, torch::kFloat) - 1).to(torch::kHalf)},
          {"b", (torch::arange(4, torch::kFloat) * 0.5).to(torch::kBFloat16)},
          {"lo", base.slice(0, 2, 6)},
          {"hi", base.slice(0, 5, 10)},
          {"ids", torch::arange(-1, 2, torch::kLong)},
          {"scalar", torch::tensor(3.0)}};
}

TEST_F(TorchBinTest, RoundTripKeepsOrderValuesDtypesAndTies) {
  const TensorList tensors = TiedSample();
  const std::filesystem::path path = temp_.path() / "pytorch_model.bin";
  ASSERT_TRUE(WriteTorchBin(path, tensors).ok());
  const absl::StatusOr<TensorList> read = ReadTorchBin(path);
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_EQ(read->size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    SCOPED_TRACE(tensors[i].name);
    EXPECT_EQ((*read)[i].name, tensors[i].name);
    EXPECT_EQ((*read)[i].tensor.scalar_type(), tensors[i].tensor.scalar_type());
    EXPECT_TRUE(torch::equal((*read)[i].tensor, tensors[i].tensor));
  }
  const auto by_name = ByName(*read);
  EXPECT_EQ(by_name.at("emb.weight").data_ptr(), by_name.at("head.weight").data_ptr());
  EXPECT_TRUE(SameStorage(by_name.at("lo"), by_name.at("hi")));
  EXPECT_EQ(by_name.at("lo").storage_offset(), 2);
  EXPECT_EQ(by_name.at("hi").storage_offset(), 5);
  EXPECT_FALSE(SameStorage(by_name.at("emb.weight"), by_name.at("lo")));
}

constexpr char kLoadScript[] = R"py(
import json, sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
def storage_ptr(t):
    return t.untyped_storage().data_ptr() if hasattr(t, "untyped_storage") else t.storage().data_ptr()
print(json.dumps({
    "type": type(sd).__module__ + "." + type(sd).__qualname__,
    "keys": list(sd.keys()),
    "dtypes": [str(t.dtype) for t in sd.values()],
    "shapes": [list(t.shape) for t in sd.values()],
    "values": [t.double().flatten().tolist() for t in sd.values()],
    "storages": [storage_ptr(t) for t in sd.values()],
    "offsets": [t.storage_offset() for t in sd.values()],
}))
)py";

TEST_F(TorchBinTest, SystemTorchLoadsItWithWeightsOnly) {
  if (!std::filesystem::exists(ICD_SYSTEM_PYTHON)) GTEST_SKIP() << ICD_SYSTEM_PYTHON << " is absent";
  const TensorList tensors = TiedSample();
  const std::filesystem::path path = temp_.path() / "pytorch_model.bin";
  ASSERT_TRUE(WriteTorchBin(path, tensors).ok());
  const auto [code, output] = RunPython(kLoadScript, path.string());
  ASSERT_EQ(code, 0) << output;
  const nlohmann::json summary = nlohmann::json::parse(output.substr(output.find('{')));
  EXPECT_EQ(summary["type"], "collections.OrderedDict");
  EXPECT_EQ(summary["keys"], nlohmann::json({"emb.weight", "head.weight", "d", "h", "b", "lo", "hi", "ids", "scalar"}));
  EXPECT_EQ(summary["dtypes"], nlohmann::json({"torch.float32", "torch.float32", "torch.float64", "torch.float16",
                                               "torch.bfloat16", "torch.float32", "torch.float32", "torch.int64",
                                               "torch.float32"}));
  for (size_t i = 0; i < tensors.size(); ++i) {
    SCOPED_TRACE(tensors[i].name);
    EXPECT_EQ(summary["shapes"][i].get<std::vector<int64_t>>(), tensors[i].tensor.sizes().vec());
    const torch::Tensor expected = tensors[i].tensor.to(torch::kDouble).flatten().contiguous();
    const std::vector<double> want(expected.data_ptr<double>(), expected.data_ptr<double>() + expected.numel());
    EXPECT_EQ(summary["values"][i].get<std::vector<double>>(), want);
  }
  const auto& storages = summary["storages"];
  EXPECT_EQ(storages[0], storages[1]);  // emb.weight / head.weight tied
  EXPECT_EQ(storages[5], storages[6]);  // lo / hi views of one storage
  EXPECT_NE(storages[0], storages[5]);
  EXPECT_NE(storages[2], storages[3]);
  EXPECT_EQ(summary["offsets"], nlohmann::json({0, 0, 0, 0, 0, 2, 5, 0, 0}));
}

// torch.save of a module's state_dict: an OrderedDict with _metadata (BUILD),
// a tied weight, a view at an offset and a transposed (non-contiguous) view.
constexpr char kSaveScript[] = R"py(
import sys, torch
m = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5))
with torch.no_grad():
    m[0].weight.copy_(torch.arange(15.).reshape(5, 3) / 4)
    m[1].bias.copy_(torch.arange(5.))
m[1].weight = m[0].weight
sd = m.state_dict()
sd["half"] = torch.arange(4.).half()
sd["view"] = sd["0.weight"][1:3]
sd["t"] = sd["0.weight"].t()
torch.save(sd, sys.argv[1])
)py";

TEST_F(TorchBinTest, ReadsWhatSystemTorchSaves) {
  if (!std::filesystem::exists(ICD_SYSTEM_PYTHON)) GTEST_SKIP() << ICD_SYSTEM_PYTHON << " is absent";
  const std::filesystem::path path = temp_.path() / "saved.bin";
  const auto [code, output] = RunPython(kSaveScript, path.string());
  ASSERT_EQ(code, 0) << output;
  const absl::StatusOr<TensorList> read = ReadTorchBin(path);
  ASSERT_TRUE(read.ok()) << read.status();
  std::vector<std::string> names;
  for (const NamedTensor& named : *read) names.push_back(named.name);
  EXPECT_THAT(names, ElementsAre("0.weight", "1.weight", "1.bias", "half", "view", "t"));
  const auto by_name = ByName(*read);
  const torch::Tensor weight = torch::arange(15, torch::kFloat).reshape({5, 3}) / 4;
  EXPECT_TRUE(torch::equal(by_name.at("0.weight"), weight));
  EXPECT_EQ(by_name.at("0.weight").data_ptr(), by_name.at("1.weight").data_ptr());
  EXPECT_TRUE(torch::equal(by_name.at("1.bias"), torch::arange(5, torch::kFloat)));
  EXPECT_TRUE(torch::equal(by_name.at("half"), torch::arange(4, torch::kFloat).to(torch::kHalf)));
  EXPECT_TRUE(torch::equal(by_name.at("view"), weight.slice(0, 1, 3)));
  EXPECT_TRUE(SameStorage(by_name.at("view"), by_name.at("0.weight")));
  EXPECT_EQ(by_name.at("view").storage_offset(), 3);
  EXPECT_TRUE(torch::equal(by_name.at("t"), weight.t()));
  EXPECT_TRUE(by_name.at("t").is_contiguous());
}

void ExpectRefused(const absl::StatusOr<TensorList>& result, const std::string& where, const std::string& reason) {
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  EXPECT_THAT(std::string(result.status().message()), HasSubstr(where));
  EXPECT_THAT(std::string(result.status().message()), HasSubstr(reason));
}

TEST_F(TorchBinTest, RefusesDisallowedGlobalInArchive) {
  // os.system('ls') as protocol 2: GLOBAL, BINUNICODE, TUPLE1, REDUCE, STOP.
  const std::filesystem::path path = WriteArchive(Bytes("\x80\x02" "cos\nsystem\n" "X\x02\x00\x00\x00ls" "\x85R."));
  ExpectRefused(ReadTorchBin(path), path.string(), "global 'os.system' is not allowed");
}

TEST_F(TorchBinTest, MissingFileIsNotFound) {
  const std::filesystem::path path = temp_.path() / "absent.bin";
  testing::ExpectError(ReadTorchBin(path).status(), absl::StatusCode::kNotFound, path.string());
}

TEST_F(TorchBinTest, RefusesLegacyAndNonZipFiles) {
  const std::filesystem::path legacy = temp_.path() / "legacy.bin";
  std::ofstream(legacy, std::ios::binary) << Bytes("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.");
  ExpectRefused(ReadTorchBin(legacy), legacy.string(), "legacy (pre-1.6, non-zip) torch.save format");
  const std::filesystem::path text = temp_.path() / "text.bin";
  std::ofstream(text) << "hello";
  ExpectRefused(ReadTorchBin(text), text.string(), "not a torch.save zip archive");
}

TEST_F(TorchBinTest, RefusesArchiveMissingStorageRecord) {
  std::vector<PickledTensor> entry(1);
  entry[0] = {"w", "0", torch::kFloat, 4, 0, {4}, {1}};
  const absl::StatusOr<std::string> pickle = PickleStateDict(entry);
  ASSERT_TRUE(pickle.ok());
  const std::filesystem::path path = WriteArchive(*pickle);
  ExpectRefused(ReadTorchBin(path), path.string(), "storage '0' has no record data/0");
}

// A record whose size the zip directory forges (here 4 GiB - 16 in a file of
// a few hundred bytes) is refused naming it, before LibTorch's reader would
// allocate that much (torch_bin_fuzz found it; the input is in the fuzz
// corpus); the archive as written still reads.
TEST_F(TorchBinTest, RefusesRecordSizesPastTheFile) {
  const std::filesystem::path path = temp_.path() / "forged.bin";
  ASSERT_TRUE(WriteTorchBin(path, {{"w", torch::arange(4, torch::kFloat32)}}).ok());
  ASSERT_TRUE(ReadTorchBin(path).ok());
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const size_t entry = bytes.find(std::string("PK\x01\x02", 4));
  ASSERT_NE(entry, std::string::npos);
  const size_t name_length = static_cast<unsigned char>(bytes[entry + 28]) |
                             (static_cast<unsigned char>(bytes[entry + 29]) << 8);
  const std::string name = bytes.substr(entry + 46, name_length);
  for (int i = 0; i < 4; ++i) bytes[entry + 24 + i] = i == 0 ? '\xf0' : '\xff';  // 0xFFFFFFF0
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  ExpectRefused(ReadTorchBin(path), path.string(),
                "zip record '" + name + "' claims 4294967280 bytes");
}

// The same forged size where the end record's 32-bit fields point at the
// first local header and a zip64 locator and record point at the real
// directory: LibTorch's reader follows the zip64 record, and so must the
// check (torch_bin_fuzz found it; the input is in the fuzz corpus).
TEST_F(TorchBinTest, RefusesRecordSizesBehindAZip64Directory) {
  const std::filesystem::path path = std::filesystem::path(ICD_FIXTURES_DIR).parent_path() /
                                     "fuzz" / "corpus" / "torch_bin" /
                                     "forged-zip64-directory-4gib";
  ASSERT_TRUE(std::filesystem::exists(path)) << path;
  ExpectRefused(ReadTorchBin(path), path.string(),
                "zip record 'two-tensors/version' claims 4294967295 bytes");
}

// The unpickler alone, over a loader that makes each storage once from
// arange (caching is the loader's job, as in ReadTorchBin).
absl::StatusOr<TensorList> Unpickle(const std::string& pickle) {
  std::map<std::string, torch::Tensor> storages;
  const StorageLoader load = [&storages](const std::string& key, torch::ScalarType dtype, int64_t numel) {
    auto [found, inserted] = storages.emplace(key, torch::Tensor());
    if (inserted) found->second = torch::arange(numel, torch::TensorOptions().dtype(dtype));
    return absl::StatusOr<torch::Tensor>(found->second);
  };
  return UnpickleStateDict("test.pkl", pickle, load);
}

TEST(UnpickleStateDictTest, RefusesEverythingButAStateDict) {
  ExpectRefused(Unpickle(Bytes("\x80\x04\x8c\x08" "builtins" "\x8c\x04" "eval" "\x93.")), "test.pkl",
                "global 'builtins.eval' is not allowed");
  ExpectRefused(Unpickle("\x80\x02" "ctorch\nFloatStorage\n)R."), "test.pkl",
                "global 'torch.FloatStorage' cannot be called");
  ExpectRefused(Unpickle("\x80\x02]."), "test.pkl", "holds a list, not a state dict");
  ExpectRefused(Unpickle("\x80\x02]q\x01h\x01" "a."), "test.pkl", "holds a list");  // a self-cycle
  ExpectRefused(Unpickle("\x80\x02" + std::string(")") + std::string(100, '\x85') + "."), "test.pkl",
                "nested deeper than 64");
  ExpectRefused(Unpickle(Bytes("\x80\x02}X\x01\x00\x00\x00kK\x05s.")), "test.pkl",
                "entry 'k' is an int, not a tensor");
  ExpectRefused(Unpickle("\x80\x02\xff."), "test.pkl", "byte 2 (opcode 0xff): unsupported pickle opcode");
}

TEST(UnpickleStateDictTest, RebuildsViewsAndChecksTheirBounds) {
  std::vector<PickledTensor> entries(2);
  entries[0] = {"a", "0", torch::kFloat, 6, 1, {2, 2}, {2, 1}};
  entries[1] = {"b", "0", torch::kFloat, 6, 0, {6}, {1}};
  absl::StatusOr<std::string> pickle = PickleStateDict(entries);
  ASSERT_TRUE(pickle.ok());
  const absl::StatusOr<TensorList> read = Unpickle(*pickle);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(torch::equal((*read)[0].tensor, torch::tensor({{1.f, 2.f}, {3.f, 4.f}})));
  EXPECT_TRUE(SameStorage((*read)[0].tensor, (*read)[1].tensor));

  ExpectRefused(Unpickle(pickle->substr(0, pickle->size() - 3)), "test.pkl", "ends without STOP");
  entries[0].storage_offset = 3;  // last element 3 + 2 + 1 = 6 of 6
  pickle = PickleStateDict(entries);
  ASSERT_TRUE(pickle.ok());
  ExpectRefused(Unpickle(*pickle), "test.pkl", "reaches past storage '0' of 6 elements");
}

}  // namespace
}  // namespace icd::io
