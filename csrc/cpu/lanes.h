// Loading and storing one SIMD step of any supported dtype as vectors of its
// math type: float and double load as themselves, bfloat16 and float16 widen
// to two float vectors (the math of low-precision tensors runs in float32).
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "capability.h"
#include "cpu_tuning.h"

namespace fusedclip::cpu {
inline namespace CPU_CAPABILITY {  // capability.h

template <typename scalar_t>
struct Lanes {
  using opmath_t = scalar_t;
  using OpVec = at::vec::Vectorized<scalar_t>;
  static constexpr int kParts = 1;
  static constexpr int64_t kWidth = OpVec::size();  // elements per step

  static void load(const scalar_t* p, int64_t count, OpVec* out) {
    out[0] = OpVec::loadu(p, count);
  }
  static void store(scalar_t* p, int64_t count, const OpVec* in) {
    in[0].store(p, count);
  }
};

template <typename scalar_t>
struct ReducedLanes {
  using opmath_t = float;
  using OpVec = at::vec::Vectorized<float>;
  using Vec = at::vec::Vectorized<scalar_t>;
  static constexpr int kParts = 2;
  static constexpr int64_t kWidth = Vec::size();

  static void load(const scalar_t* p, int64_t count, OpVec* out) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(p, count));
    out[0] = lo;
    out[1] = hi;
  }
  static void store(scalar_t* p, int64_t count, const OpVec* in) {
    at::vec::convert_from_float<scalar_t>(in[0], in[1]).store(p, count);
  }
};

template <>
struct Lanes<at::BFloat16> : ReducedLanes<at::BFloat16> {};
template <>
struct Lanes<at::Half> : ReducedLanes<at::Half> {};

// Where torch's fused CPU kernels start their scalar code in a tensor of
// `numel` elements of scalar_t. They leave the last t = numel % W elements (W
// the vector width) to a scalar loop. In torch's AVX-512 kernels the compiler
// vectorizes that loop once at half the width, so only the last t % (W / 2)
// are scalar; in its AVX2 kernels all t are (measured on torch 2.13 for every
// t: tests/test_bitwise_torch.py, run on both). The rules whose scalar code
// rounds differently (include/fusedclip/sgd.h, adam.h) run those elements
// with SCALAR_TAIL. Each copy of the kernels (capability.h) has its own, for
// the vector set it runs: torch's where both follow the CPU, or where
// FUSEDCLIP_CPU_CAPABILITY and ATEN_CPU_CAPABILITY name the same set.
template <typename scalar_t>
int64_t scalar_tail_begin(int64_t numel) {
  constexpr int64_t kWidth = Lanes<scalar_t>::kWidth;
#if defined(CPU_CAPABILITY_AVX512)
  return numel - numel % kWidth % (kWidth / 2);
#else
  return numel - numel % kWidth;
#endif
}

// Software prefetch, prefetch_distance() bytes ahead of the element a loop is
// at (cpu_tuning.h: chosen per CPU, 0 for none). A loop reads the distance
// once, into a Prefetch, before its first element. A prefetch never faults,
// so running past the end of an array is harmless; the address is formed as
// an integer, since a pointer past the end of its array would be undefined
// behaviour.
class Prefetch {
 public:
  Prefetch() : bytes_(prefetch_distance()) {}

  template <typename T>
  void to_read(const T* p) const {
    if (bytes_ != 0) __builtin_prefetch(ahead(p), 0);
  }
  // For data the loop will also write: the line arrives ready to be modified.
  template <typename T>
  void to_write(T* p) const {
    if (bytes_ != 0) __builtin_prefetch(ahead(p), 1);
  }

 private:
  template <typename T>
  const void* ahead(const T* p) const {
    return reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p) + bytes_);
  }

  std::uintptr_t bytes_;
};

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
