// Which copy of the CPU kernels runs. They are compiled once per vector set
// (capability.h; setup.py defines FUSEDCLIP_CPU_<SET> here for each set it
// built), and when the library loads the widest set is chosen that was built,
// that this CPU supports and that FUSEDCLIP_CPU_CAPABILITY allows ("default",
// "avx2" or "avx512": a cap, as ATEN_CPU_CAPABILITY is torch's). Its kernels
// become those of the CPU dispatch key, so a call pays nothing for the choice.
// This file is compiled once, for the build machine's baseline: it must run on
// every CPU.
#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu_tuning.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#define FUSEDCLIP_DECLARE_CPU_KERNELS(SET)              \
  namespace fusedclip::cpu::SET {                       \
  void add_norm_kernels(CpuKernels& kernels);           \
  void add_update_kernels(CpuKernels& kernels);         \
  }
#define FUSEDCLIP_CPU_KERNELS_OF(SET) \
  &fusedclip::cpu::SET::add_norm_kernels, &fusedclip::cpu::SET::add_update_kernels

#if defined(FUSEDCLIP_CPU_AVX512)
FUSEDCLIP_DECLARE_CPU_KERNELS(AVX512)
#define FUSEDCLIP_AVX512_KERNELS FUSEDCLIP_CPU_KERNELS_OF(AVX512)
#else
#define FUSEDCLIP_AVX512_KERNELS nullptr, nullptr
#endif
#if defined(FUSEDCLIP_CPU_AVX2)
FUSEDCLIP_DECLARE_CPU_KERNELS(AVX2)
#define FUSEDCLIP_AVX2_KERNELS FUSEDCLIP_CPU_KERNELS_OF(AVX2)
#else
#define FUSEDCLIP_AVX2_KERNELS nullptr, nullptr
#endif
#if defined(FUSEDCLIP_CPU_DEFAULT)
FUSEDCLIP_DECLARE_CPU_KERNELS(DEFAULT)
#define FUSEDCLIP_DEFAULT_KERNELS FUSEDCLIP_CPU_KERNELS_OF(DEFAULT)
#else
#define FUSEDCLIP_DEFAULT_KERNELS nullptr, nullptr
#endif

namespace fusedclip::cpu {
namespace {

using Adder = void (*)(CpuKernels&);

// What setup.py compiles each set with (ARCH_FLAGS), asked of the CPU.
// __builtin_cpu_supports also checks that the OS saves the vector registers.
bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_default() { return true; }

struct KernelSet {
  const char* name;  // as FUSEDCLIP_CPU_CAPABILITY and cpu_tuning() spell it
  Adder norm, update;  // null: not built
  bool (*runs_here)();
};

// Widest first.
const KernelSet kSets[] = {
    {"avx512", FUSEDCLIP_AVX512_KERNELS, cpu_has_avx512},
    {"avx2", FUSEDCLIP_AVX2_KERNELS, cpu_has_avx2},
    {"default", FUSEDCLIP_DEFAULT_KERNELS, cpu_has_default},
};
constexpr int kNumSets = sizeof(kSets) / sizeof(kSets[0]);

std::string built_names() {
  std::string names;
  for (const KernelSet& set : kSets) {
    if (set.norm == nullptr) continue;
    names += (names.empty() ? "" : ", ") + std::string(set.name);
  }
  return names;
}

// The set chosen, or none; `error` is what cpu_capability() reports: a bad
// FUSEDCLIP_CPU_CAPABILITY (the widest set that runs is taken meanwhile, so
// nothing else fails first) or no built set that runs on this CPU.
struct Choice {
  const KernelSet* set = nullptr;
  std::string error;
};

Choice choose() {
  Choice choice;
  int widest = 0;
  const char* env = std::getenv("FUSEDCLIP_CPU_CAPABILITY");
  if (env != nullptr && *env != '\0') {
    const std::string wanted = env;
    while (widest < kNumSets && wanted != kSets[widest].name) ++widest;
    if (widest == kNumSets) {
      choice.error = "fusedclip: FUSEDCLIP_CPU_CAPABILITY must be 'default', 'avx2' or "
                     "'avx512', got '" + wanted + "'";
      widest = 0;
    }
  }
  for (int i = widest; i < kNumSets; ++i) {
    if (kSets[i].norm != nullptr && kSets[i].runs_here()) {
      choice.set = &kSets[i];
      return choice;
    }
  }
  if (choice.error.empty()) {
    choice.error = "fusedclip: this build's CPU kernels (vector sets: " + built_names() +
                   ") cannot run on this CPU" + (widest > 0 ? " within FUSEDCLIP_CPU_CAPABILITY=" +
                   std::string(env) : std::string()) + "; build them for every set (unset "
                   "FUSEDCLIP_CPU_ARCH) or for this CPU";
  }
  return choice;
}

const Choice& chosen() {
  static const Choice choice = choose();
  return choice;
}

}  // namespace

std::string cpu_capability() {
  const Choice& choice = chosen();
  TORCH_CHECK(choice.error.empty(), choice.error);
  return choice.set->name;
}

// Without a set to run (cpu_capability() says why, when `import fusedclip`
// calls cpu_tuning()), the CPU kernels stay unregistered.
TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  const KernelSet* set = chosen().set;
  if (set == nullptr) return;
  CpuKernels kernels;
  set->norm(kernels);
  set->update(kernels);
  m.impl("multi_tensor_norm", kernels.norm);
  m.impl("multi_tensor_unit_norm", kernels.unit_norm);
  int i = 0;
#define FUSEDCLIP_REGISTER_UPDATE(Rule) \
  m.impl((std::string(Rule::kName) + "_").c_str(), kernels.update[i++]);
  FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_REGISTER_UPDATE)
#undef FUSEDCLIP_REGISTER_UPDATE
}

}  // namespace fusedclip::cpu
