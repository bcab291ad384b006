// Every RPC's success path and every refusal with its code, through
// icd::Client against the real service. After each refused call the model's
// logits and version are unchanged.
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "harness.h"
#include "icd/v1/permutation.grpc.pb.h"

namespace icd::testing {
namespace {

using absl::StatusCode;

class ServiceTest : public LoadedModelTest {
 protected:
  void SetUp() override {
    LoadedModelTest::SetUp();
    if (HasFatalFailure()) return;
    baseline_ = Snapshot();
  }

  // A refused call changed nothing: same version, bit-identical logits.
  void ExpectUnchanged() {
    const ModelState now = Snapshot();
    EXPECT_EQ(now.version, baseline_.version);
    EXPECT_EQ(now.logits, baseline_.logits);
  }
  v1::Symmetries Syms() {
    auto s = client().GetSymmetries("m");
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : v1::Symmetries();
  }
  static v1::Permutation Perm(const std::string& group,
                              std::vector<int64_t> index) {
    v1::Permutation p;
    p.set_group(group);
    for (int64_t i : index) p.add_index(i);
    return p;
  }

  ModelState baseline_;
};

TEST_F(ServiceTest, HealthServing) {
  auto serving = client().Health();
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
}

TEST_F(ServiceTest, LoadListUnload) {
  ASSERT_OK_AND_ASSIGN(info, client().LoadModel("m2", "mamba1-small/mamba_ssm"));
  EXPECT_EQ(info.name(), "m2");
  EXPECT_EQ(info.family(), "mamba1");
  EXPECT_EQ(info.layout(), "mamba_ssm");
  EXPECT_EQ(info.dtype(), "float32");
  EXPECT_EQ(info.version(), 1u);
  EXPECT_EQ(info.dims().at("d_model"), 64);
  EXPECT_GT(info.parameters(), 0);
  ASSERT_OK_AND_ASSIGN(list, client().ListModels());
  std::vector<std::string> names;
  for (const auto& m : list) names.push_back(m.name());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"m", "m2"}));
  EXPECT_TRUE(client().UnloadModel("m2").ok());
  ExpectCode(client().UnloadModel("m2"), StatusCode::kNotFound, "m2");
  ASSERT_OK_AND_ASSIGN(after, client().ListModels());
  ASSERT_EQ(after.size(), 1u);
  EXPECT_EQ(after[0].name(), "m");
}

TEST_F(ServiceTest, GetSymmetriesListsTheGroups) {
  const v1::Symmetries syms = Syms();
  EXPECT_EQ(syms.model(), "m");
  std::map<std::string, int64_t> size;
  for (const auto& g : syms.groups()) {
    size[g.name()] = g.size();
    EXPECT_FALSE(g.members().empty()) << g.name();
  }
  EXPECT_EQ(size.at("residual"), 64);
  EXPECT_EQ(size.at("layers.0.inner"), 128);
  EXPECT_EQ(size.at("layers.1.state"), 8);
  EXPECT_EQ(size.at("layers.1.dt_rank"), 4);
  EXPECT_EQ(syms.groups_size(), 1 + 2 * 3);
}

TEST_F(ServiceTest, ApplyVerifyEvaluate) {
  std::mt19937_64 rng(7);
  const auto perms = RandomPermutations(Syms(), rng);
  ASSERT_OK_AND_ASSIGN(report, client().ApplyPermutation("m", perms, 1));
  EXPECT_EQ(report.version(), 2u);
  EXPECT_TRUE(report.verified());
  EXPECT_TRUE(report.correctness().ok());
  EXPECT_LE(report.correctness().rel_l2(), report.correctness().tolerance());
  EXPECT_EQ(report.groups_size(), static_cast<int>(perms.size()));
  ASSERT_OK_AND_ASSIGN(verify, client().Verify("m"));
  EXPECT_TRUE(verify.ok());
  EXPECT_GT(verify.tokens(), 0);
  ASSERT_OK_AND_ASSIGN(eval, EvaluateGolden(client(), "m", golden_));
  EXPECT_EQ(std::vector<int64_t>(eval.shape().begin(), eval.shape().end()),
            golden_.logits_shape);
  EXPECT_EQ(eval.tokens(), golden_.batch * (golden_.logits_shape[1] - 1));
  EXPECT_GT(eval.mean_nll(), 0.0);
  EXPECT_LE(RelL2({eval.logits().begin(), eval.logits().end()}, golden_.logits),
            1e-4);
  // Skip-verify apply still bumps the version.
  ASSERT_OK_AND_ASSIGN(skip, client().ApplyPermutation("m", perms, 2, true));
  EXPECT_EQ(skip.version(), 3u);
  EXPECT_FALSE(skip.verified());
}

TEST_F(ServiceTest, ReadWriteTensorsRoundTrip) {
  ASSERT_OK_AND_ASSIGN(tensors, client().ReadTensors("m"));
  ASSERT_FALSE(tensors.empty());
  for (const auto& t : tensors) {
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    EXPECT_EQ(static_cast<int64_t>(t.data.size()), numel * 4) << t.name;
    EXPECT_EQ(t.dtype, "float32");
  }
  ASSERT_OK_AND_ASSIGN(some, client().ReadTensors("m", {tensors[0].name}));
  ASSERT_EQ(some.size(), 1u);
  EXPECT_EQ(some[0].data, tensors[0].data);
  // Writing the same weights back: new version, same function.
  ASSERT_OK_AND_ASSIGN(v2, client().WriteTensors("m", tensors, 1));
  EXPECT_EQ(v2, 2u);
  EXPECT_EQ(Snapshot().logits, baseline_.logits);
  // A real change of function: zero one tensor; the probe reference moves
  // with it, so Verify stays ok.
  Tensor changed = tensors.back();
  std::fill(changed.data.begin(), changed.data.end(), '\0');
  ASSERT_OK_AND_ASSIGN(v3, client().WriteTensors("m", {changed}, 2));
  EXPECT_EQ(v3, 3u);
  EXPECT_NE(Snapshot().logits, baseline_.logits);
  ASSERT_OK_AND_ASSIGN(verify, client().Verify("m"));
  EXPECT_TRUE(verify.ok());
  ASSERT_OK_AND_ASSIGN(v4, client().WriteTensors("m", {tensors.back()}, 0));
  EXPECT_EQ(v4, 4u);
  EXPECT_EQ(Snapshot().logits, baseline_.logits);
}

TEST_F(ServiceTest, WriteTensorsRefusals) {
  ASSERT_OK_AND_ASSIGN(tensors, client().ReadTensors("m"));
  Tensor wrong = tensors[0];
  wrong.data += "abcd";
  wrong.shape.back() += 1;
  ExpectCode(client().WriteTensors("m", {wrong}).status(),
             StatusCode::kInvalidArgument, wrong.name);
  ExpectUnchanged();
  Tensor unknown = tensors[0];
  unknown.name = "no.such.tensor";
  // The engine's choice: a tensor the model lacks is NOT_FOUND.
  ExpectCode(client().WriteTensors("m", {unknown}).status(),
             StatusCode::kNotFound, "no.such.tensor");
  ExpectCode(client().ReadTensors("m", {"no.such.tensor"}).status(),
             StatusCode::kNotFound, "no.such.tensor");
  ExpectUnchanged();
  Tensor bad_len = tensors[0];
  bad_len.data.pop_back();
  ExpectCode(client().WriteTensors("m", {bad_len}).status(),
             StatusCode::kInvalidArgument, bad_len.name);
  ExpectUnchanged();
  ExpectCode(client().WriteTensors("m", {tensors[0]}, 7).status(),
             StatusCode::kFailedPrecondition);
  ExpectUnchanged();
  ExpectCode(client().WriteTensors("nope", {tensors[0]}).status(),
             StatusCode::kNotFound, "nope");
  ExpectUnchanged();
}

// A client that goes away mid-stream (cancel after a complete tensor and a
// partial one, and a stream that simply ends without `last`) leaves the model
// as it was: WriteTensors applies nothing until the stream is complete.
TEST_F(ServiceTest, WriteTensorsStreamCutShortChangesNothing) {
  ASSERT_OK_AND_ASSIGN(tensors, client().ReadTensors("m"));
  ASSERT_GE(tensors.size(), 2u);
  auto channel = grpc::CreateChannel(harness_.address(), grpc::InsecureChannelCredentials());
  auto stub = v1::PermutationService::NewStub(channel);
  auto chunk_of = [](const Tensor& tensor, std::string data, bool last) {
    v1::TensorChunk chunk;
    chunk.set_name(tensor.name);
    for (int64_t d : tensor.shape) chunk.add_shape(d);
    chunk.set_dtype(tensor.dtype);
    std::reverse(data.begin(), data.end());  // new values: the write would change the model
    chunk.set_data(std::move(data));
    chunk.set_last(last);
    return chunk;
  };
  for (const bool cancel : {true, false}) {
    SCOPED_TRACE(cancel ? "cancelled" : "ended without last");
    grpc::ClientContext context;
    v1::WriteReport report;
    auto writer = stub->WriteTensors(&context, &report);
    v1::TensorChunk whole = chunk_of(tensors[0], tensors[0].data, /*last=*/true);
    whole.set_model("m");
    ASSERT_TRUE(writer->Write(whole));
    const std::string& second = tensors[1].data;
    ASSERT_TRUE(writer->Write(chunk_of(tensors[1], second.substr(0, second.size() / 2), false)));
    grpc::Status status;
    if (cancel) {
      context.TryCancel();
      status = writer->Finish();
      EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
    } else {
      writer->WritesDone();
      status = writer->Finish();
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    }
    ExpectUnchanged();
  }
  auto serving = client().Health();
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
}

TEST_F(ServiceTest, ExportAndReload) {
  std::mt19937_64 rng(11);
  ASSERT_TRUE(client().ApplyPermutation("m", RandomPermutations(Syms(), rng)).ok());
  const ModelState permuted = Snapshot();
  ASSERT_OK_AND_ASSIGN(report, client().ExportModel("m", "out"));
  EXPECT_EQ(report.version(), 2u);
  EXPECT_EQ(fs::path(report.path()), harness_.export_root() / "out");
  std::vector<std::string> files(report.files().begin(), report.files().end());
  EXPECT_NE(std::find(files.begin(), files.end(), "config.json"), files.end());
  for (const auto& f : files) EXPECT_TRUE(fs::exists(fs::path(report.path()) / f)) << f;
  ASSERT_OK_AND_ASSIGN(info, client().LoadModel("back", report.path()));
  EXPECT_EQ(info.layout(), "hf");
  ASSERT_OK_AND_ASSIGN(eval, EvaluateGolden(client(), "back", golden_));
  EXPECT_EQ(std::vector<float>(eval.logits().begin(), eval.logits().end()),
            permuted.logits);
}

TEST_F(ServiceTest, UnknownModelIsNotFound) {
  ExpectCode(client().GetSymmetries("nope").status(), StatusCode::kNotFound, "nope");
  std::mt19937_64 rng(1);
  ExpectCode(client().ApplyPermutation("nope", RandomPermutations(Syms(), rng)).status(),
             StatusCode::kNotFound, "nope");
  ExpectCode(client().Verify("nope").status(), StatusCode::kNotFound, "nope");
  ExpectCode(EvaluateGolden(client(), "nope", golden_).status(), StatusCode::kNotFound, "nope");
  ExpectCode(client().ReadTensors("nope").status(), StatusCode::kNotFound, "nope");
  ExpectCode(client().ExportModel("nope", "x").status(), StatusCode::kNotFound, "nope");
  EXPECT_FALSE(fs::exists(harness_.export_root() / "x"));
  ExpectUnchanged();
}

TEST_F(ServiceTest, LoadRefusals) {
  ExpectCode(client().LoadModel("m", "mamba1-small/hf").status(),
             StatusCode::kAlreadyExists, "m");
  ExpectCode(client().LoadModel("x", "no-such-dir").status(), StatusCode::kNotFound);
  ExpectCode(client().LoadModel("x", "/etc").status(), StatusCode::kPermissionDenied);
  // A real checkpoint, but outside the roots.
  const std::string outside = (GoldenDir() / "mamba1-small" / "hf").string();
  ExpectCode(client().LoadModel("x", outside).status(), StatusCode::kPermissionDenied);
  // `..` escaping the root, relative and absolute.
  ExpectCode(client().LoadModel("x", "mamba1-small/../../").status(),
             StatusCode::kPermissionDenied);
  ExpectCode(client().LoadModel("x", "../../etc").status(),
             StatusCode::kPermissionDenied);
  ExpectCode(client().LoadModel("x", (harness_.model_root() / "mamba1-small" / ".." / ".." / "..").string()).status(),
             StatusCode::kPermissionDenied);
  // `..` that stays inside is fine.
  EXPECT_TRUE(client().LoadModel("y", "mamba1-small/../mamba1-small/hf").ok());
  // A symlink inside the root pointing outside.
  fs::create_directory_symlink(GoldenDir() / "mamba1-small" / "hf",
                               harness_.model_root() / "escape");
  ExpectCode(client().LoadModel("x", "escape").status(), StatusCode::kPermissionDenied);
  ExpectCode(client().LoadModel("x", "").status(), StatusCode::kInvalidArgument);
  ExpectCode(client().LoadModel("", "mamba1-small/hf").status(), StatusCode::kInvalidArgument);
  ASSERT_OK_AND_ASSIGN(list, client().ListModels());
  EXPECT_EQ(list.size(), 2u);  // m and y
  ExpectUnchanged();
}

TEST_F(ServiceTest, BadPermutationsAreInvalidArgumentNamingTheGroup) {
  std::vector<int64_t> id(64);
  for (int64_t i = 0; i < 64; ++i) id[static_cast<std::size_t>(i)] = i;
  auto repeated = id;
  repeated[1] = 0;
  auto out_of_range = id;
  out_of_range[3] = 64;
  auto negative = id;
  negative[3] = -1;
  const std::vector<std::pair<std::string, v1::Permutation>> cases = {
      {"residual", Perm("residual", std::vector<int64_t>(id.begin(), id.end() - 1))},
      {"residual", Perm("residual", repeated)},
      {"residual", Perm("residual", out_of_range)},
      {"residual", Perm("residual", negative)},
      {"layers.9.inner", Perm("layers.9.inner", id)},
  };
  for (const auto& [group, perm] : cases) {
    ExpectCode(client().ApplyPermutation("m", {perm}).status(),
               StatusCode::kInvalidArgument, group);
    ExpectUnchanged();
  }
  // All or nothing: a valid one before an invalid one moves nothing.
  std::mt19937_64 rng(3);
  auto perms = RandomPermutations(Syms(), rng);
  perms.push_back(Perm("layers.0.state", {0, 0, 1, 2, 3, 4, 5, 6}));
  ExpectCode(client().ApplyPermutation("m", perms).status(),
             StatusCode::kInvalidArgument, "layers.0.state");
  ExpectUnchanged();
}

TEST_F(ServiceTest, StaleVersionIsFailedPrecondition) {
  std::mt19937_64 rng(5);
  const auto perms = RandomPermutations(Syms(), rng);
  ExpectCode(client().ApplyPermutation("m", perms, 2).status(),
             StatusCode::kFailedPrecondition);
  ExpectUnchanged();
  ASSERT_TRUE(client().ApplyPermutation("m", perms, 1).ok());
  ExpectCode(client().ApplyPermutation("m", perms, 1).status(),
             StatusCode::kFailedPrecondition);
}

TEST_F(ServiceTest, FailedCheckIsAbortedAndRestores) {
  // A tolerance below float32 reordering noise makes the post-apply check
  // fail: ABORTED, weights restored, version unchanged. (A draw whose
  // rel_l2 is exactly 0 would pass; several draws make an abort certain.)
  std::mt19937_64 rng(13);
  int aborted = 0;
  for (int i = 0; i < 5 && aborted == 0; ++i) {
    v1::ApplyRequest request;
    request.set_model("m");
    for (const auto& p : RandomPermutations(Syms(), rng)) *request.add_permutations() = p;
    request.set_tolerance(1e-300);
    auto report = client().ApplyPermutation(request);
    if (report.ok()) {
      EXPECT_EQ(report->correctness().rel_l2(), 0.0);
      baseline_ = Snapshot();
      continue;
    }
    ExpectCode(report.status(), StatusCode::kAborted);
    ++aborted;
    ExpectUnchanged();
  }
  EXPECT_EQ(aborted, 1);
}

TEST_F(ServiceTest, ExportRefusals) {
  ASSERT_TRUE(client().ExportModel("m", "taken").ok());
  const auto before = fs::last_write_time(harness_.export_root() / "taken");
  ExpectCode(client().ExportModel("m", "taken").status(), StatusCode::kAlreadyExists);
  EXPECT_EQ(fs::last_write_time(harness_.export_root() / "taken"), before);
  ExpectCode(client().ExportModel("m", (harness_.tmp() / "elsewhere").string()).status(),
             StatusCode::kPermissionDenied);
  EXPECT_FALSE(fs::exists(harness_.tmp() / "elsewhere"));
  ExpectCode(client().ExportModel("m", "../models/sneaky").status(),
             StatusCode::kPermissionDenied);
  EXPECT_FALSE(fs::exists(harness_.model_root() / "sneaky"));
  // A symlinked directory inside the export root that leads out of it.
  fs::create_directory(harness_.tmp() / "outside");
  fs::create_directory_symlink(harness_.tmp() / "outside",
                               harness_.export_root() / "link");
  ExpectCode(client().ExportModel("m", "link/new").status(),
             StatusCode::kPermissionDenied);
  EXPECT_TRUE(fs::is_empty(harness_.tmp() / "outside"));
  // A dangling symlink is an existing path.
  fs::create_directory_symlink(harness_.tmp() / "nowhere",
                               harness_.export_root() / "dangling");
  ExpectCode(client().ExportModel("m", "dangling").status(),
             StatusCode::kAlreadyExists);
  ExpectUnchanged();
}

// ComputePermutation and CapturePermutation: traces_test.cc; MeasureLatency:
// latency_service_test.cc.

// Issue 15, finding 8: tensor streams of many chunks, both ways, through
// the C++ client. Every fixture tensor is under the default 1 MiB chunk, so
// the server here cuts ReadTensors chunks at 1000 bytes and the client sends
// WriteTensors chunks of 777: the 32 KiB embedding takes 33 and 43 chunks.
TEST(ServiceChunkTest, TensorsOfManyChunksRoundTripBitForBit) {
  rpc::ServiceOptions options;
  options.chunk_bytes = 1000;
  Harness harness(options);
  ASSERT_TRUE(harness.client().LoadModel("m", "mamba1-small/hf").ok());
  const std::string name = "backbone.embeddings.weight";
  ASSERT_OK_AND_ASSIGN(file, ReadSafetensors(GoldenDir() / "mamba1-small" / "hf" /
                                             "model.safetensors"));
  const std::vector<float>& values = file.at(name).f32;
  const std::string bytes(reinterpret_cast<const char*>(values.data()), values.size() * 4);
  ASSERT_EQ(bytes.size(), 128u * 64u * 4u);

  // On the wire: chunks of at most 1000 bytes, `last` on the final one only.
  auto stub = v1::PermutationService::NewStub(
      grpc::CreateChannel(harness.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::ReadTensorsRequest request;
  request.set_model("m");
  request.add_names(name);
  auto reader = stub->ReadTensors(&context, request);
  v1::TensorChunk chunk;
  std::string streamed;
  int chunks = 0, lasts = 0;
  while (reader->Read(&chunk)) {
    ++chunks;
    EXPECT_EQ(chunk.name(), name);
    EXPECT_LE(chunk.data().size(), 1000u);
    EXPECT_EQ(chunk.last(), streamed.size() + chunk.data().size() == bytes.size());
    lasts += chunk.last();
    streamed += chunk.data();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(chunks, 33);
  EXPECT_EQ(lasts, 1);
  EXPECT_TRUE(streamed == bytes) << "the chunks do not add up to the tensor";

  // The client reassembles them; it writes in chunks of 777 bytes.
  ClientOptions small;
  small.chunk_bytes = 777;
  auto client = Client::Connect(harness.address(), small);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_OK_AND_ASSIGN(read, (*client)->ReadTensors("m", {name}));
  ASSERT_EQ(read.size(), 1u);
  EXPECT_TRUE(read[0].data == bytes);
  Tensor reversed = read[0];
  std::reverse(reversed.data.begin(), reversed.data.end());  // new bytes, same size
  for (size_t i = 0; i + 4 <= reversed.data.size(); i += 4) {  // keep them finite floats
    std::reverse(reversed.data.begin() + static_cast<std::ptrdiff_t>(i),
                 reversed.data.begin() + static_cast<std::ptrdiff_t>(i + 4));
  }
  ASSERT_OK_AND_ASSIGN(version, (*client)->WriteTensors("m", {reversed}, 1));
  EXPECT_EQ(version, 2u);
  ASSERT_OK_AND_ASSIGN(again, (*client)->ReadTensors("m", {name}));
  ASSERT_EQ(again.size(), 1u);
  EXPECT_TRUE(again[0].data == reversed.data) << "a multi-chunk write did not land whole";
  EXPECT_FALSE(again[0].data == bytes);
}

TEST(ServiceAuthTest, TokenIsRequiredExceptForHealth) {
  rpc::ServiceOptions options;
  options.token = "s3cret";
  Harness harness(options);
  auto anonymous = harness.NewClient("");
  auto wrong = harness.NewClient("s3cre");
  ExpectCode(anonymous->ListModels().status(), StatusCode::kUnauthenticated);
  ExpectCode(wrong->ListModels().status(), StatusCode::kUnauthenticated);
  ExpectCode(wrong->LoadModel("m", "mamba1-small/hf").status(),
             StatusCode::kUnauthenticated);
  auto serving = anonymous->Health();
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
  ASSERT_TRUE(harness.client().LoadModel("m", "mamba1-small/hf").ok());
  ExpectCode(wrong->UnloadModel("m"), StatusCode::kUnauthenticated);
  auto list = harness.client().ListModels();
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->size(), 1u);
}

}  // namespace
}  // namespace icd::testing
