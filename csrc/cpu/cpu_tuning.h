// How the CPU kernels are tuned on this machine: the SIMD set they were
// compiled for and the software-prefetch distance of their element loops.
// Neither changes any result, only the speed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace fusedclip::cpu {

// Bytes ahead of the current element that the loops prefetch; 0 for none.
std::uintptr_t prefetch_distance();

// The fusedclip::cpu_tuning op: sets the prefetch distance where given, and
// returns the SIMD set ("avx512", "avx2" or "default") and the distance.
std::tuple<std::string, int64_t> cpu_tuning(std::optional<int64_t> prefetch_distance);

}  // namespace fusedclip::cpu
