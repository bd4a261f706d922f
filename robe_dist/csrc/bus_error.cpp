#include "bus_error.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>

namespace robe_dist {
namespace {

char g_line[1024];
volatile sig_atomic_t g_length = 0;
struct sigaction g_previous;
bool g_installed = false;

void on_bus_error(int sig, siginfo_t* info, void*) {
  // only async-signal-safe calls here. A kernel-raised SIGBUS (si_code > 0: a page of a mapped
  // file that is no longer there, ...) gets the line; one sent by kill(2) or raise(3) does not.
  if (info != nullptr && info->si_code > 0) {
    size_t done = 0, length = static_cast<size_t>(g_length);
    while (done < length) {
      ssize_t n = write(STDERR_FILENO, g_line + done, length - done);
      if (n <= 0) break;
      done += static_cast<size_t>(n);
    }
  }
  // then whatever was there before (the default: die of the signal; or faulthandler's dump)
  sigaction(sig, &g_previous, nullptr);
  raise(sig);
}

}  // namespace

void set_bus_error_message(const std::string& line) {
  size_t n = std::min(line.size(), sizeof(g_line) - 2);
  g_length = 0;  // (a signal meanwhile prints nothing rather than half a line)
  std::atomic_signal_fence(std::memory_order_seq_cst);
  memcpy(g_line, line.data(), n);
  g_line[n] = '\n';
  std::atomic_signal_fence(std::memory_order_seq_cst);
  g_length = static_cast<sig_atomic_t>(n + 1);
  if (g_installed) return;  // (the handler is ours already: keep the handler it replaced)
  struct sigaction action;
  memset(&action, 0, sizeof(action));
  action.sa_sigaction = on_bus_error;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_SIGINFO | SA_NODEFER;  // (raise() from the handler must be delivered at once)
  if (sigaction(SIGBUS, &action, &g_previous) == 0) g_installed = true;
}

}  // namespace robe_dist
