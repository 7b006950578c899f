// Loading and storing one SIMD step of any supported dtype as vectors of its
// math type: float and double load as themselves, bfloat16 and float16 widen
// to two float vectors (the math of low-precision tensors runs in float32).
#pragma once

#include <cstdint>
#include <type_traits>

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

// Calls f(i, count) for the SIMD steps i = begin, begin + W, ... < end of W
// elements each. A full step's count is W as a compile-time constant
// (std::integral_constant), so that its loads and stores (at::vec's loadu and
// store, which take a count) compile to plain vector moves; a runtime count
// branches to a memcpy fallback on every step, which also keeps GCC from
// unrolling the loops over a step's arrays. Only the last step, where partial,
// gets its count at run time.
template <int64_t W, typename F>
C10_ALWAYS_INLINE void for_each_step(int64_t begin, int64_t end, F&& f) {
  int64_t i = begin;
  for (; i + W <= end; i += W) f(i, std::integral_constant<int64_t, W>{});
  if (i < end) f(i, end - i);
}

// Whether torch's fused CPU kernels of this vector set round a * b + c once in
// their scalar code. torch compiles them in GCC's GNU mode, whose default
// -ffp-contract=fast fuses such an expression wherever the target has a fused
// multiply-add instruction: its AVX2 and AVX-512 builds (-mfma) have one, the
// x86 baseline that its DEFAULT build targets has none (elsewhere, aarch64
// say, the baseline has one). Where none, torch's vector code does not fuse
// either (at::vec's default fmadd is a * b + c, two roundings), so its scalar
// and vector code round alike (measured on torch 2.13, ATEN_CPU_CAPABILITY=
// default: every a * b + c of its fused SGD rounds twice, in both).
#if (defined(__x86_64__) || defined(__i386__)) && !defined(__FMA__)
constexpr bool kTorchScalarCodeFuses = false;
#else
constexpr bool kTorchScalarCodeFuses = true;
#endif

// Where fusedclip's element loop leaves its vectors for the rule's scalar
// code (SCALAR_TAIL: include/fusedclip/sgd.h, adam.h, whose scalar code fuses
// some multiply-adds the other way round) in a tensor of `numel` elements of
// scalar_t: where torch's fused CPU kernels start theirs. They leave the last
// t = numel % W elements (W the vector width) to a scalar loop. In torch's
// AVX-512 kernels the compiler vectorizes that loop once at half the width, so
// only the last t % (W / 2) are scalar; in its AVX2 kernels all t are
// (measured on torch 2.13 for every t: tests/test_bitwise_torch.py, run on
// both). Where its scalar code does not fuse (kTorchScalarCodeFuses), it
// rounds as its vector code does, so fusedclip runs the whole tensor on
// vectors, the last one partial: the shared scalar math (fc_fma, fc_lerp on a
// float or double) always fuses, as the CUDA kernels and the other sets need.
// Each copy of the kernels (capability.h) has its own, for the vector set it
// runs: torch's where both follow the CPU, or where FUSEDCLIP_CPU_CAPABILITY
// and ATEN_CPU_CAPABILITY name the same set.
template <typename scalar_t>
int64_t scalar_tail_begin(int64_t numel) {
  constexpr int64_t kWidth = Lanes<scalar_t>::kWidth;
  if constexpr (!kTorchScalarCodeFuses) return numel;
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
