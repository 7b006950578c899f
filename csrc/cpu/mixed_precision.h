// The block conversions of the CPU driver's mixed-precision calls (issue 20;
// the roundings are include/fusedclip/precision.h): arrays that are not
// float32 are widened into float32 scratch (exactly), the float32 kernel runs
// on the scratch, and the scratch is narrowed back, rounded to nearest even
// (as the homogeneous kernels store), stochastically (sr), or, for a
// parameter of an fp32 master, to nearest with ties away from zero (bf16) /
// even (fp16). Nothing here depends on the rule: compiled once per vector set.
// The loops are plain element loops over a block (ATen's vectorized
// conversions, or bit operations the compiler vectorizes).
#pragma once

#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>

#include "capability.h"
#include "fusedclip/precision.h"
#include "fusedclip/rules.h"
#include "lanes.h"

namespace fusedclip::cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// The dtype of one array of a mixed call.
enum class Dtype : uint8_t { F32, BF16, F16 };

inline Dtype dtype_of(at::ScalarType t) {
  if (t == at::kBFloat16) return Dtype::BF16;
  if (t == at::kHalf) return Dtype::F16;
  TORCH_INTERNAL_ASSERT(t == at::kFloat, "fusedclip: a mixed call's arrays are float32, "
                        "bfloat16 or float16, got ", t);
  return Dtype::F32;
}

// A tensor's fp32 master: none, a full float32 copy, or the low 16 bits of it
// beside a bfloat16 parameter (precision.h: bf16_rebuild).
enum class Master : uint8_t { None, Full, Remainder };

// One tensor of a mixed call: its arrays (element 0 of each is element 0 of
// the tensor, in the order the kernel walks) and their dtypes.
struct MixedTensor {
  void* param;
  const void* grad;  // the param's dtype
  std::array<void*, kMaxStates> states;
  void* master;
  Dtype param_dtype;
  std::array<Dtype, kMaxStates> state_dtypes;
  Master master_kind;
  bool sr;  // stochastic rounding: keys[0] the param's, keys[1 + k] state k's
  bool sr_first;  // sr and some array rounded stochastically (sr_block_first per block)
  std::array<precision::SrKey, 1 + kMaxStates> keys;
  int num_states;
};

// Elements per block: float32 scratch for param, grad and every state, 10 KiB
// in all, stays in L1.
constexpr int64_t kMixedBlock = 512;

// n elements of a bfloat16/float16 array, widened into float32 (exact).
template <typename T>
void widen(const T* src, float* dst, int64_t n) {
  using L = Lanes<T>;
  using OpVec = typename L::OpVec;
  constexpr int64_t kFloats = OpVec::size();  // per float vector
  typename L::OpVec v[L::kParts];
  for (int64_t j = 0; j < n; j += L::kWidth) {
    const int64_t count = std::min<int64_t>(L::kWidth, n - j);
    L::load(src + j, count, v);
    v[0].store(dst + j, std::min<int64_t>(kFloats, count));
    if (count > kFloats) v[1].store(dst + j + kFloats, count - kFloats);
  }
}

// n float32 values stored as T, rounded to nearest even: the conversion the
// homogeneous kernels store with (lanes.h).
template <typename T>
void narrow(const float* src, T* dst, int64_t n) {
  using L = Lanes<T>;
  using OpVec = typename L::OpVec;
  constexpr int64_t kFloats = OpVec::size();  // per float vector
  OpVec v[L::kParts];
  for (int64_t j = 0; j < n; j += L::kWidth) {
    const int64_t count = std::min<int64_t>(L::kWidth, n - j);
    v[0] = OpVec::loadu(src + j, std::min<int64_t>(kFloats, count));
    v[1] = count > kFloats ? OpVec::loadu(src + j + kFloats, count - kFloats) : OpVec(0.0f);
    L::store(dst + j, count, v);
  }
}

inline void widen_any(const void* src, Dtype d, int64_t offset, float* dst, int64_t n) {
  if (d == Dtype::BF16) {
    widen(static_cast<const at::BFloat16*>(src) + offset, dst, n);
  } else {
    widen(static_cast<const at::Half*>(src) + offset, dst, n);
  }
}

// The first hash round of a block's element pairs (precision.h:
// sr_pair_first), shared by the tensor's arrays (their keys share k0), for
// the tensor's elements [offset, offset + n) (offset even: offsets are
// multiples of kMixedBlock). `first` has room for (n + 1) / 2.
inline void sr_block_first(uint32_t k0, int64_t offset, uint32_t* first, int64_t n) {
  static_assert(kMixedBlock % 2 == 0, "sr_block_first: blocks start at even elements");
  const uint32_t pair0 = static_cast<uint32_t>(offset) >> 1;
  const int64_t pairs = (n + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) first[p] = precision::sr_pair_first(k0, pair0 + static_cast<uint32_t>(p));
}

// The random bits of a block of one array: 16 per element (precision.h:
// sr_bits_low, whose high half they are), from the block's first round and
// the array's key (a block never crosses a multiple of 2^32 elements). r has
// room for n rounded up to even.
inline void sr_block_bits(precision::SrKey key, int64_t offset, const uint32_t* first,
                          uint16_t* r, int64_t n) {
  const precision::SrKey block_key = precision::sr_key_high(key, offset);
  const int64_t pairs = (n + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const uint32_t h = precision::sr_pair_second(block_key, first[p]);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    std::memcpy(r + 2 * p, &h, sizeof h);  // the low half first: one store (GCC vectorizes it
                                           // as such; the two below it interleaves, 1.4x slower)
#else
    r[2 * p] = static_cast<uint16_t>(h);
    r[2 * p + 1] = static_cast<uint16_t>(h >> 16);
#endif
  }
}

// n float32 values stored as bfloat16/float16, rounded stochastically with the
// random bits of the tensor's elements [offset, offset + n) under `key`
// (`first`: sr_block_first's).
inline void narrow_sr(float* src, void* dst, Dtype d, precision::SrKey key, int64_t offset,
                      const uint32_t* first, int64_t n) {
  alignas(64) uint16_t r[kMixedBlock];
  sr_block_bits(key, offset, first, r, n);
  if (d == Dtype::BF16) {
    uint16_t* out = reinterpret_cast<uint16_t*>(static_cast<at::BFloat16*>(dst) + offset);
    for (int64_t j = 0; j < n; ++j) {
      out[j] = precision::sr_bf16(precision::float_bits(src[j]), static_cast<uint32_t>(r[j]) << 16);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      src[j] = precision::sr_fp16_grid(src[j], static_cast<uint32_t>(r[j]) << 16);
    }
    narrow(src, static_cast<at::Half*>(dst) + offset, n);  // exact: on the fp16 grid
  }
}

// Stores n float32 values of a non-float32 array: stochastically where
// `first` (sr_block_first's) is given, else rounded to nearest even.
inline void narrow_any(float* src, void* dst, Dtype d, const uint32_t* first,
                       precision::SrKey key, int64_t offset, int64_t n) {
  if (first != nullptr) {
    narrow_sr(src, dst, d, key, offset, first, n);
  } else if (d == Dtype::BF16) {
    narrow(src, static_cast<at::BFloat16*>(dst) + offset, n);
  } else {
    narrow(src, static_cast<at::Half*>(dst) + offset, n);
  }
}

// The fp32 masters of n bfloat16 parameters and their remainders.
inline void rebuild_masters(const at::BFloat16* param, const int16_t* remainder, float* dst,
                            int64_t n) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(param);
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = precision::bits_float(precision::bf16_rebuild(p[j], remainder[j]));
  }
}

// bfloat16 parameters from n fp32 masters, to nearest with ties away from zero
// (and the masters' remainders where `remainder` is not null).
inline void split_masters(const float* master, at::BFloat16* param, int16_t* remainder,
                          int64_t n) {
  uint16_t* p = reinterpret_cast<uint16_t*>(param);
  for (int64_t j = 0; j < n; ++j) p[j] = precision::bf16_round_half_away(precision::float_bits(master[j]));
  if (remainder == nullptr) return;
  for (int64_t j = 0; j < n; ++j) remainder[j] = precision::bf16_remainder(precision::float_bits(master[j]));
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
