#include "icdctl_output.h"

#include <algorithm>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <sstream>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/str_cat.h"

namespace icd::ctl {

absl::StatusOr<std::string> JsonText(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string out;
  const auto s = google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!s.ok()) {
    return absl::InternalError(absl::StrCat("JSON encoding: ", std::string(s.message())));
  }
  return out;
}

absl::Status PrintJson(const google::protobuf::Message& message) {
  auto text = JsonText(message);
  if (!text.ok()) return text.status();
  std::cout << *text << "\n";
  return absl::OkStatus();
}

absl::StatusOr<nlohmann::json> MessageJson(const google::protobuf::Message& message) {
  auto text = JsonText(message);
  if (!text.ok()) return text.status();
  return nlohmann::json::parse(*text);
}

std::string Fmt(double v, int precision) {
  std::ostringstream os;
  os << std::setprecision(precision) << v;
  return os.str();
}

void PrintTable(const std::vector<std::vector<std::string>>& rows,
                const std::vector<bool>& right) {
  std::vector<size_t> width(right.size(), 0);
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size() && c < width.size(); ++c) {
      width[c] = std::max(width[c], row[c].size());
    }
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size() && c < width.size(); ++c) {
      const std::string pad(width[c] - row[c].size(), ' ');
      if (c > 0) line += "  ";
      line += right[c] ? pad + row[c] : row[c] + (c + 1 < row.size() ? pad : "");
    }
    std::cout << line << "\n";
  }
}

void PrintModel(const v1::ModelInfo& m) {
  std::cout << m.name() << ": " << (m.architecture().empty() ? m.family() : m.architecture())
            << " (" << m.family() << ", " << m.layout() << " layout) on "
            << m.device() << ", " << m.dtype() << ", " << m.parameters()
            << " parameters, version " << m.version() << "\n";
  std::cout << "  path        " << m.path() << "\n";
  std::cout << "  fingerprint " << m.fingerprint() << "\n";
  std::map<std::string, int64_t> dims(m.dims().begin(), m.dims().end());
  std::cout << "  dims       ";
  for (const auto& [k, v] : dims) std::cout << " " << k << "=" << v;
  std::cout << "\n";
  if (m.placement_size() > 1) {
    std::cout << "  placement  ";
    for (const auto& range : m.placement()) {
      std::cout << " " << range.device() << "=" << range.first_layer() << "-"
                << range.last_layer() << " (" << range.bytes() << " bytes)";
    }
    std::cout << "\n";
  }
}

void PrintCorrectness(const v1::CorrectnessReport& c) {
  std::cout << (c.ok() ? "OK" : "MISMATCH") << ": rel_l2 " << Fmt(c.rel_l2(), 3)
            << (c.ok() ? " <= " : " > ") << "tolerance " << Fmt(c.tolerance(), 3)
            << ", max_abs " << Fmt(c.max_abs(), 3) << ", max_rel " << Fmt(c.max_rel(), 3)
            << ", top-1 agreement " << Fmt(100.0 * c.top1_agreement(), 5) << "% over "
            << c.tokens() << " probe tokens\n";
}

void PrintApplyReport(const std::string& model, const v1::ApplyReport& report) {
  std::cout << "applied " << report.groups_size() << " permutation"
            << (report.groups_size() == 1 ? "" : "s") << " to " << model << ": version "
            << report.version() << ", apply " << Fmt(report.apply_ms()) << " ms\n";
  if (report.verified()) {
    std::cout << "verified in " << Fmt(report.verify_ms()) << " ms: ";
    PrintCorrectness(report.correctness());
  } else {
    std::cout << "not verified (--skip-verify); run `icdctl verify " << model << "`\n";
  }
}

void PrintPermutationResults(const std::vector<v1::PermutationResult>& results) {
  std::vector<int32_t> block_sizes;
  bool any_nm = false;
  for (const auto& r : results) {
    for (const auto& b : r.blocks()) {
      if (std::find(block_sizes.begin(), block_sizes.end(), b.block()) == block_sizes.end()) {
        block_sizes.push_back(b.block());
      }
    }
    any_nm = any_nm || r.nm_upper_bound() > 0;
  }
  std::vector<std::string> header = {"GROUP", "Q", "NULL Q", "STRUCTURE", "CLUSTERS", "ARI"};
  for (int32_t b : block_sizes) header.push_back(absl::StrCat("BLOCKS@", b));
  if (any_nm) header.push_back("N:M");
  for (const char* h : {"TOKENS", "MS"}) header.push_back(h);
  std::vector<std::vector<std::string>> rows = {header};
  for (const auto& r : results) {
    std::vector<std::string> row = {
        r.permutation().group(), Fmt(r.modularity(), 3), Fmt(r.modularity_null(), 3),
        r.structure_found() ? "yes" : "no", std::to_string(r.clusters()),
        r.ari() != 0 ? Fmt(r.ari(), 3) : "-"};
    for (int32_t size : block_sizes) {
      std::string cell = "-";
      for (const auto& b : r.blocks()) {
        if (b.block() == size) cell = Fmt(b.identity(), 3) + " -> " + Fmt(b.solved(), 3);
      }
      row.push_back(cell);
    }
    if (any_nm) {
      row.push_back(r.nm_upper_bound() > 0 ? Fmt(100.0 * r.nm_efficacy(), 3) + "%" : "-");
    }
    row.push_back(absl::StrCat(r.tokens(), " + ", r.holdout_tokens()));
    row.push_back(Fmt(r.solve_ms(), 4));
    rows.push_back(std::move(row));
  }
  std::vector<bool> right(header.size(), true);
  right[0] = false;
  PrintTable(rows, right);
  std::cout << "Q vs NULL Q: modularity of the clusters found and of shuffled rows; "
               "STRUCTURE no: no gain claimed.\nBLOCKS@b: blocks touched per held-out "
               "row, identity -> solved (lower is better). TOKENS: rows + held-out rows.\n";
}

}  // namespace icd::ctl
