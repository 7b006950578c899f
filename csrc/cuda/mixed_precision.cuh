// Element access of the mixed-precision update kernel (issue 20; the
// roundings are include/fusedclip/precision.h's, shared with the CPU driver).
//
// In a mixed call every element array (param, grad, each state list, the
// master) has its own storage, one per array for the whole call. The storage
// is a runtime value of the kernel argument, not a template parameter: one
// kernel per (rule, variant, transforms) serves every combination of dtypes,
// and the branches on it are uniform (every thread of the launch takes the
// same one), which a memory-bound loop does not notice. The math is float32.
//
// Elements are moved as raw bits in 32-bit registers: 4 bytes of a float32
// array, 2 of a 16-bit one (bfloat16, float16, the int16 remainders of a
// master), and converted to and from float32 apart from the moves, so that
// the moves are compiled twice (2- and 4-byte elements) whatever the dtypes.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fusedclip/precision.h"

namespace fusedclip::cuda {

// Elements one thread moves per array and step of the mixed loop: one 16-byte
// load of a float32 array, 8 bytes of a 16-bit one.
constexpr int kMixedGroup = 4;

// Element `e` of a chunk as float32, from its raw bits. Exact, and the same
// conversions as the one-dtype kernels' (c10's).
__device__ __forceinline__ float raw_to_float(Storage s, uint32_t raw) {
  switch (s) {
    case Storage::BF16:
      return static_cast<float>(
          c10::BFloat16(static_cast<uint16_t>(raw), c10::BFloat16::from_bits()));
    case Storage::F16:
      return static_cast<float>(c10::Half(static_cast<uint16_t>(raw), c10::Half::from_bits()));
    default:
      return precision::bits_float(raw);
  }
}

// x in the storage, rounded to nearest even (c10's conversions, as the
// one-dtype kernels store): exact for a value already on the target's grid.
__device__ __forceinline__ uint32_t float_to_raw(Storage s, float x) {
  switch (s) {
    case Storage::BF16:
      return c10::BFloat16(x).x;
    case Storage::F16:
      return c10::Half(x).x;
    default:
      return precision::float_bits(x);
  }
}

// x stored stochastically rounded with the random bits r (precision.h; a
// float32 array stores x itself). bfloat16 by bits, as the CPU driver does
// (a NaN keeps its payload, quieted).
__device__ __forceinline__ uint32_t stochastic_raw(Storage s, float x, uint32_t r) {
  switch (s) {
    case Storage::BF16:
      return precision::sr_bf16(precision::float_bits(x), r);
    case Storage::F16:
      return c10::Half(precision::sr_fp16_grid(x, r)).x;  // exact: on the fp16 grid
    default:
      return precision::float_bits(x);
  }
}

// Whether array `p` (at a chunk's first element) can be moved kMixedGroup
// elements at a time: aligned to a group's bytes.
__device__ __forceinline__ bool group_aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % (kMixedGroup * bytes) == 0;
}

// Elements i .. i + kMixedGroup - 1 of an array of E (uint32_t: 4-byte
// elements, uint16_t: 2-byte ones; E4 the vector type of four), p at the
// chunk's first element, n elements in the chunk: one load where `whole`
// (aligned, and all of them in the chunk), else one by one, 0 past n.
template <typename E, typename E4>
__device__ __forceinline__ void load_elements(const void* p, int i, int n, bool whole,
                                              uint32_t (&raw)[kMixedGroup]) {
  static_assert(kMixedGroup == 4, "one uint4 / ushort4 per group");
  const E* a = static_cast<const E*>(p) + i;
  if (whole) {
    const E4 v = *reinterpret_cast<const E4*>(a);
    raw[0] = v.x, raw[1] = v.y, raw[2] = v.z, raw[3] = v.w;
  } else {
#pragma unroll
    for (int k = 0; k < kMixedGroup; ++k) raw[k] = i + k < n ? a[k] : 0u;
  }
}

// The store of load_elements: elements past n are left alone.
template <typename E, typename E4>
__device__ __forceinline__ void store_elements(void* p, int i, int n, bool whole,
                                               const uint32_t (&raw)[kMixedGroup]) {
  E* a = static_cast<E*>(p) + i;
  if (whole) {
    *reinterpret_cast<E4*>(a) = E4{static_cast<E>(raw[0]), static_cast<E>(raw[1]),
                                   static_cast<E>(raw[2]), static_cast<E>(raw[3])};
  } else {
#pragma unroll
    for (int k = 0; k < kMixedGroup; ++k) {
      if (i + k < n) a[k] = static_cast<E>(raw[k]);
    }
  }
}

// Elements i .. i + kMixedGroup - 1 of an array of `bytes`-byte elements
// (load_elements).
__device__ __forceinline__ void load_group(const void* p, int bytes, int i, int n, bool whole,
                                           uint32_t (&raw)[kMixedGroup]) {
  if (bytes == 4) {
    load_elements<uint32_t, uint4>(p, i, n, whole, raw);
  } else {
    load_elements<uint16_t, ushort4>(p, i, n, whole, raw);
  }
}

// The store of load_group (store_elements).
__device__ __forceinline__ void store_group(void* p, int bytes, int i, int n, bool whole,
                                            const uint32_t (&raw)[kMixedGroup]) {
  if (bytes == 4) {
    store_elements<uint32_t, uint4>(p, i, n, whole, raw);
  } else {
    store_elements<uint16_t, ushort4>(p, i, n, whole, raw);
  }
}

}  // namespace fusedclip::cuda
