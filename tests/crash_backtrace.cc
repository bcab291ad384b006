// For the GPU test binaries, which run where there is no debugger: a fatal
// signal prints the stack (glibc's backtrace) to stderr before the process
// dies of it, so a crash in a GPU run says where it happened.
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <cstring>

namespace {

void PrintStackAndDie(int signal_number) {
  static const char kHeader[] = "\n*** fatal signal; stack (innermost first):\n";
  (void)!write(STDERR_FILENO, kHeader, sizeof(kHeader) - 1);
  void* frames[64];
  const int depth = backtrace(frames, 64);
  backtrace_symbols_fd(frames, depth, STDERR_FILENO);
  // The default action (a core, the exit status 128 + signal) as before.
  signal(signal_number, SIG_DFL);
  raise(signal_number);
}

const bool kInstalled = [] {
  // backtrace() loads libgcc on its first call, which a signal handler must
  // not do: call it once now.
  void* frame[1];
  (void)backtrace(frame, 1);
  for (int signal_number : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) {
    signal(signal_number, PrintStackAndDie);
  }
  return true;
}();

}  // namespace
