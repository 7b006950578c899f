// The CPU tuning of cpu_tuning.h. The prefetch distance starts from the
// environment (FUSEDCLIP_CPU_PREFETCH, in bytes) or else from the CPU's
// vendor, the one thing the measurements split on:
//  - Intel Xeon (2-core VM): the hardware prefetcher alone kept too few lines
//    in flight; 2 KiB ahead took the fp32 AdamW update of GPT-2 small from
//    93 to 74 ms and the norm pass from 22 to 18 ms (1, 2 and 4 KiB measured
//    the same).
//  - AMD EPYC (Zen 4, 2-core VM): software prefetch only got in the way of the
//    hardware's. In two runs 2 KiB ahead made the fp32 update passes 1-16%
//    and the norm passes 1-20% slower; bf16 updates moved within +-4%
//    (bench/bench_prefetch.py, which times both in one run;
//    bench/results/2026-11-29-prefetch-cpu-2t.json).
#include "cpu_tuning.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace fusedclip::cpu {
namespace {

constexpr int64_t kDefaultDistance = 2048;
constexpr int64_t kMaxDistance = 1 << 20;

bool cpu_is_amd() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return false;
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return std::strcmp(vendor, "AuthenticAMD") == 0;
#else
  return false;
#endif
}

std::string distance_error(long long bytes, const char* where) {
  if (bytes >= 0 && bytes <= kMaxDistance) return "";
  return std::string("fusedclip: ") + where + " must be a prefetch distance in bytes from 0 (none) to " +
         std::to_string(kMaxDistance) + ", got " + std::to_string(bytes);
}

// The distance the process starts with. It is set when the library loads, so
// no kernel can meet a bad FUSEDCLIP_CPU_PREFETCH inside its parallel region:
// a bad value leaves the CPU's default in place and is reported by cpu_tuning(),
// which `import fusedclip` calls.
struct InitialDistance {
  int64_t bytes = 0;
  std::string error;

  InitialDistance() {
    bytes = cpu_is_amd() ? 0 : kDefaultDistance;
    const char* env = std::getenv("FUSEDCLIP_CPU_PREFETCH");
    if (env == nullptr || *env == '\0') return;
    char* end = nullptr;
    const long long value = std::strtoll(env, &end, 10);
    if (*end != '\0') {
      error = std::string("fusedclip: FUSEDCLIP_CPU_PREFETCH must be a number of bytes, got '") +
              env + "'";
    } else {
      error = distance_error(value, "FUSEDCLIP_CPU_PREFETCH");
    }
    if (error.empty()) bytes = value;
  }
};

const InitialDistance initial;
std::atomic<int64_t> distance{initial.bytes};

}  // namespace

std::uintptr_t prefetch_distance() {
  return static_cast<std::uintptr_t>(distance.load(std::memory_order_relaxed));
}

std::tuple<std::string, int64_t> cpu_tuning(std::optional<int64_t> prefetch_distance) {
  TORCH_CHECK(initial.error.empty(), initial.error);
  const std::string arch = cpu_capability();
  if (prefetch_distance.has_value()) {
    const std::string error = distance_error(*prefetch_distance, "prefetch_distance");
    TORCH_CHECK(error.empty(), error);
    distance.store(*prefetch_distance, std::memory_order_relaxed);
  }
  return {arch, distance.load(std::memory_order_relaxed)};
}

}  // namespace fusedclip::cpu
