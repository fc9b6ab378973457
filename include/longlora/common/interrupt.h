// SIGINT/SIGTERM/SIGHUP for commands that write aside and rename (export,
// make-data): the handler only records the signal; the work checks it between
// chunks and throws Interrupted, so the temporary output is removed on the way out
// (the destructors that own it run) instead of being left behind by a default kill.
#pragma once

#include <stdexcept>
#include <string>

namespace longlora {

// Not a longlora::Error: code that catches Error to reword it must let this through.
class Interrupted : public std::runtime_error {
 public:
  Interrupted(int signal, const std::string& what) : std::runtime_error(what), signal_(signal) {}
  int signal() const { return signal_; }
  // 128 + signal, as a shell reports a command killed by it.
  int exit_code() const { return 128 + signal_; }

 private:
  int signal_;
};

// Ctrl-C on `longlora-train ... | tee log` stops tee too, and the next log line
// killed the process with SIGPIPE before it could save or clean up. With SIGPIPE
// ignored, writes to a closed pipe fail instead (stdout's are reported at exit).
// Part of install_interrupt_handlers; a run calls it first thing, as it logs while
// loading.
void ignore_sigpipe();
// Installs the handlers (once; a signal the parent set to be ignored, as nohup does,
// stays ignored), SIGPIPE ignored too. A second signal exits at once with 128 + signal.
void install_interrupt_handlers();

// The first signal received since install_interrupt_handlers(), or 0.
int interrupt_signal();

// Throws Interrupted(signal, what) when a signal has arrived.
void check_interrupt(const std::string& what = "interrupted");

// Tests only: sleeps LONGLORA_TEST_INTERRUPT_PAUSE_MS milliseconds when that is set,
// so that a test can signal a command while it is writing.
void interrupt_test_pause();

}  // namespace longlora
