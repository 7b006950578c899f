// How the CPU kernels are tuned on this machine: the SIMD set they run with
// and the software-prefetch distance of their element loops. The distance
// changes no result, only the speed; the set changes which of torch's CPU
// kernels the results match bit for bit (those of the same ATen capability).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace fusedclip::cpu {

// Bytes ahead of the current element that the loops prefetch; 0 for none.
std::uintptr_t prefetch_distance();

// The vector set the kernels run with ("avx512", "avx2" or "default"), chosen
// when the library loads (dispatch.cpp). Throws where FUSEDCLIP_CPU_CAPABILITY
// is bad or no set that was built runs on this CPU.
std::string cpu_capability();

// The fusedclip::cpu_tuning op: sets the prefetch distance where given, and
// returns the vector set the kernels run with (cpu_capability()) and the distance.
std::tuple<std::string, int64_t> cpu_tuning(std::optional<int64_t> prefetch_distance);

}  // namespace fusedclip::cpu
