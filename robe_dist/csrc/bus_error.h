// robe_dist._C: one line on stderr when the process dies of SIGBUS.
//
// The training data is read through memory maps (np.load(mmap_mode="r")): a data file truncated
// or replaced while the run reads it ends the process with SIGBUS at the next page, inside NumPy,
// where no Python code can run. For a SIGBUS the kernel raised (not one sent by kill), the
// handler writes a fixed line (async-signal-safe write(2)), then puts back the handler it
// replaced (the default, or faulthandler's) and raises the signal again, so the process still
// ends as killed by SIGBUS and torchrun reports it so.
#pragma once

#include <string>

namespace robe_dist {

// Installs the handler with `line` (a newline is added; at most 1022 bytes are kept); called
// again, it only changes the line.
void set_bus_error_message(const std::string& line);

}  // namespace robe_dist
