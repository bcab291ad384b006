// How client-supplied text enters the server's log.
#ifndef ICD_RPC_LOG_TEXT_H_
#define ICD_RPC_LOG_TEXT_H_

#include <cstddef>
#include <string>
#include <string_view>

namespace icd::rpc {

// Most bytes of one client string a log line shows.
inline constexpr std::size_t kMaxLoggedTextBytes = 256;

// `text` as one double-quoted token that cannot forge a log line: quotes,
// backslashes, control and non-ASCII bytes escaped (\n, \", \\, \xNN), cut
// after `max_bytes` bytes of input with the full length said:
//   "m\nrpc=Fake" -> "m\\nrpc=Fake" (quoted); a 4 MiB name -> its first 256
//   bytes, then ...(4194304 bytes).
std::string QuoteForLog(std::string_view text, std::size_t max_bytes = kMaxLoggedTextBytes);

}  // namespace icd::rpc

#endif  // ICD_RPC_LOG_TEXT_H_
