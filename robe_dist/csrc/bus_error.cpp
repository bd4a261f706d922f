#include "bus_error.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>

namespace robe_dist {
namespace {

char g_line[1024];
volatile size_t g_length = 0;

void on_bus_error(int sig) {
  size_t done = 0;
  while (done < g_length) {  // only async-signal-safe calls from here on
    ssize_t n = write(STDERR_FILENO, g_line + done, g_length - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

}  // namespace

void set_bus_error_message(const std::string& line) {
  size_t n = std::min(line.size(), sizeof(g_line) - 2);
  g_length = 0;  // (a signal meanwhile prints nothing rather than half a line)
  memcpy(g_line, line.data(), n);
  g_line[n] = '\n';
  g_length = n + 1;
  struct sigaction action;
  memset(&action, 0, sizeof(action));
  action.sa_handler = on_bus_error;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_NODEFER;  // (raise() from the handler must be delivered at once)
  sigaction(SIGBUS, &action, nullptr);
}

}  // namespace robe_dist
