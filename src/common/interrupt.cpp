#include "longlora/common/interrupt.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <thread>

namespace longlora {
namespace {

std::atomic<int> g_signal{0};

void on_signal(int sig) {
  int none = 0;
  // The second signal: the user wants out now, even at the cost of the temporary.
  if (!g_signal.compare_exchange_strong(none, sig)) ::_exit(128 + sig);
}

}  // namespace

void ignore_sigpipe() { ::signal(SIGPIPE, SIG_IGN); }

void install_interrupt_handlers() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  ignore_sigpipe();
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction old {};
    if (::sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;  // a write in progress completes; the check comes after it
    ::sigaction(sig, &sa, nullptr);
  }
}

int interrupt_signal() { return g_signal.load(); }

void check_interrupt(const std::string& what) {
  if (const int sig = g_signal.load()) throw Interrupted(sig, what);
}

void interrupt_test_pause() {
  if (const char* ms = std::getenv("LONGLORA_TEST_INTERRUPT_PAUSE_MS"))
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(ms)));
}

}  // namespace longlora
