// The engine's status helpers: the early-return macros (icd/status_macros.h,
// shared with the clients), InternalFailure and Guarded.
#ifndef ICD_CORE_STATUS_MACROS_H_
#define ICD_CORE_STATUS_MACROS_H_

#include <exception>
#include <new>
#include <optional>
#include <string>

#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "icd/status_macros.h"

namespace icd {

// The payload under which an InternalFailure carries its detail.
inline constexpr char kInternalDetailPayload[] = "type.icd/internal-detail";

// INTERNAL for a failure inside the engine (a LibTorch exception, a broken
// invariant): the message says only what failed; the exception's text
// (LibTorch's carries a backtrace with load addresses) rides as a payload,
// which the server logs and never sends to a client.
inline absl::Status InternalFailure(absl::string_view what, absl::string_view detail) {
  absl::Status status = absl::InternalError(
      absl::StrCat(what, " failed: an internal error (the server's log has the detail)"));
  status.SetPayload(kInternalDetailPayload, absl::Cord(detail));
  return status;
}

// RESOURCE_EXHAUSTED for an allocation that failed (std::bad_alloc; LibTorch's
// CPU allocator, "can't allocate memory" / "not enough memory"; its CUDA
// allocator, "out of memory"), saying how many bytes were asked for when the
// text says; the exception's full text rides as InternalFailure's payload
// does, for the log only. nullopt for any other failure.
inline std::optional<absl::Status> OutOfMemory(absl::string_view what, const std::exception& e) {
  const absl::string_view text = e.what();
  const bool out_of_memory = dynamic_cast<const std::bad_alloc*>(&e) != nullptr ||
                             absl::StrContains(text, "out of memory") ||
                             absl::StrContains(text, "can't allocate memory") ||
                             absl::StrContains(text, "not enough memory");
  if (!out_of_memory) return std::nullopt;
  std::string asked;  // "allocate N" (LibTorch's "tried to allocate N bytes")
  for (size_t at = text.find("allocate "); at != absl::string_view::npos && asked.empty();
       at = text.find("allocate ", at + 1)) {
    size_t end = at + 9;
    while (end < text.size() && absl::ascii_isdigit(static_cast<unsigned char>(text[end]))) ++end;
    if (end > at + 9) {
      asked = absl::StrCat(" (", text.substr(at + 9, end - at - 9), " bytes asked for)");
    }
  }
  absl::Status status = absl::ResourceExhaustedError(absl::StrCat(
      what, ": out of memory on the model's device", asked,
      "; use fewer tokens or a smaller batch, or unload a model"));
  status.SetPayload(kInternalDetailPayload, absl::Cord(text));
  return status;
}

// fn(), or a status when it throws: OutOfMemory's, else InternalFailure(what,
// ...). LibTorch reports errors by exception, and none may cross the engine
// API.
template <typename Fn>
auto Guarded(const char* what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::exception& e) {
    if (std::optional<absl::Status> exhausted = OutOfMemory(what, e)) return *exhausted;
    return InternalFailure(what, e.what());
  }
}

}  // namespace icd

#endif  // ICD_CORE_STATUS_MACROS_H_
