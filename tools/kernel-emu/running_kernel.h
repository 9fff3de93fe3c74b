// The kernel a process is running, named when SIGTERM ends it: the tests and
// scripts/emulate-kernels.sh time a hung run out with SIGTERM first, so that its output says
// which kernel hung. Shared by the emulator's test drivers (check.h) and the fake CUDA driver.
#pragma once
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

// Set before a kernel runs and cleared (or replaced) after.
inline std::atomic<const char*> g_running_kernel{nullptr};

namespace running_kernel_detail {
inline int fd = 2;
inline const char* prefix = "";
inline const char* idle = "(none)";

inline void report_and_exit(int) {
    const char* name = g_running_kernel.load();
    if (name == nullptr) name = idle;
    // Only async-signal-safe calls here.
    ssize_t ignored = write(fd, prefix, strlen(prefix));
    ignored = write(fd, name, strlen(name));
    ignored = write(fd, "\n", 1);
    (void)ignored;
    _exit(128 + SIGTERM);
}
}  // namespace running_kernel_detail

// On SIGTERM, writes `prefix`, the running kernel's name (`idle` when none runs) and a newline
// to `fd`, then exits 128 + SIGTERM. A handler the process already has is kept.
inline void name_running_kernel_on_sigterm(int fd, const char* prefix, const char* idle) {
    struct sigaction current {};
    if (sigaction(SIGTERM, nullptr, &current) != 0 || current.sa_handler != SIG_DFL) return;
    running_kernel_detail::fd = fd;
    running_kernel_detail::prefix = prefix;
    running_kernel_detail::idle = idle;
    signal(SIGTERM, running_kernel_detail::report_and_exit);
}
