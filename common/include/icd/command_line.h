// One pass over a command line, as icd-server and icdctl read theirs: each
// argument's name ("--name=value" split at the '='), and its value on
// demand, inline or the following argument.
#ifndef ICD_COMMAND_LINE_H_
#define ICD_COMMAND_LINE_H_

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace icd {

class CommandLine {
 public:
  CommandLine(int argc, char** argv) : argc_(argc), argv_(argv) {}

  // Moves to the next argument (argv[1] first); false past the last.
  bool Next() {
    if (++index_ >= argc_) return false;
    name_ = argv_[index_];
    inline_value_.reset();
    if (const auto eq = name_.find('='); name_.rfind("--", 0) == 0 && eq != std::string::npos) {
      inline_value_ = name_.substr(eq + 1);
      name_.resize(eq);
    }
    return true;
  }

  const std::string& name() const { return name_; }

  // The value after '=', else the following argument (which it takes);
  // INVALID_ARGUMENT "NAME needs a value" when there is none.
  absl::StatusOr<std::string> Value() {
    if (inline_value_.has_value()) return *inline_value_;
    if (index_ + 1 >= argc_) {
      return absl::InvalidArgumentError(absl::StrCat(name_, " needs a value"));
    }
    return std::string(argv_[++index_]);
  }

 private:
  int argc_;
  char** argv_;
  int index_ = 0;
  std::string name_;
  std::optional<std::string> inline_value_;
};

}  // namespace icd

#endif  // ICD_COMMAND_LINE_H_
