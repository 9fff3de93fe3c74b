// ASAN_POISON_MEMORY_REGION / ASAN_UNPOISON_MEMORY_REGION: AddressSanitizer's manual poisoning
// where the build has it (scripts/emulate-kernels.sh, scripts/fake-gpu-test.sh --build-asan),
// no-ops otherwise, also where the compiler ships no sanitizer headers.
#pragma once
#if __has_include(<sanitizer/asan_interface.h>)
#include <sanitizer/asan_interface.h>
#else
#define ASAN_POISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#define ASAN_UNPOISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#endif
