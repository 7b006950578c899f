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

// One tensor of a mixed call: its arrays (element 0 of each is element 0 of
// the tensor, in the order the kernel walks) and their dtypes.
struct MixedTensor {
  void* param;
  const void* grad;  // the param's dtype
  std::array<void*, kMaxStates> states;
  void* master;
  Storage param_dtype;
  std::array<Storage, kMaxStates> state_dtypes;
  MasterKind master_kind;
  bool sr;  // stochastic rounding: keys[0] the param's, keys[1 + k] state k's
  bool sr_first;  // sr and some array rounded stochastically (sr_block_first per block)
  std::array<precision::SrKey, 1 + kMaxStates> keys;
  int num_states;
};

// Asks for elements [begin, begin + n) of an array of `bytes`-byte elements
// ahead of their use: a software prefetch per cache line (which never
// faults). A mixed block's phases (widen, kernel, narrow) keep the memory
// busy only while they widen and narrow; the arrays of the block after next,
// asked for before this block's work, arrive while it and the next compute
// (about 5% off a large bf16 + stochastic rounding or master-weights step on
// a 2-core AMD EPYC; one block ahead gained less).
inline void prefetch_array(const void* base, int64_t bytes, int64_t begin, int64_t n) {
  const char* p = static_cast<const char*>(base) + begin * bytes;
  for (int64_t off = 0; off < n * bytes; off += 64) __builtin_prefetch(p + off, 1);
}

// Elements per block: float32 scratch for param, grad and every state, 10 KiB
// in all, stays in L1.
constexpr int64_t kMixedBlock = 512;

// n elements of a bfloat16/float16 array, widened into float32 (exact).
template <typename T>
void widen(const T* src, float* dst, int64_t n) {
  using L = Lanes<T>;
  constexpr int64_t kFloats = L::OpVec::size();  // per float vector
  for_each_step<L::kWidth>(0, n, [&](int64_t j, auto count) {
    typename L::OpVec v[L::kParts];
    L::load(src + j, count, v);
    v[0].store(dst + j, std::min<int64_t>(kFloats, count));
    if (count > kFloats) v[1].store(dst + j + kFloats, count - kFloats);
  });
}

// n float32 values stored as T, rounded to nearest even: the conversion the
// homogeneous kernels store with (lanes.h).
template <typename T>
void narrow(const float* src, T* dst, int64_t n) {
  using L = Lanes<T>;
  using OpVec = typename L::OpVec;
  constexpr int64_t kFloats = OpVec::size();  // per float vector
  for_each_step<L::kWidth>(0, n, [&](int64_t j, auto count) {
    OpVec v[L::kParts];
    v[0] = OpVec::loadu(src + j, std::min<int64_t>(kFloats, count));
    v[1] = count > kFloats ? OpVec::loadu(src + j + kFloats, count - kFloats) : OpVec(0.0f);
    L::store(dst + j, count, v);
  });
}

inline void widen_any(const void* src, Storage d, int64_t offset, float* dst, int64_t n) {
  if (d == Storage::BF16) {
    widen(static_cast<const at::BFloat16*>(src) + offset, dst, n);
  } else {
    widen(static_cast<const at::Half*>(src) + offset, dst, n);
  }
}

// Stochastic rounding's hash words (precision.h: sr_word) pair element j of a
// block with element j + 256: a block is one span of them.
static_assert(kMixedBlock == 512, "a mixed block is one span of sr_word");
constexpr int64_t kSrHalf = kMixedBlock / 2;

// The first hash round of a block's words (precision.h: sr_pair_first),
// shared by the tensor's arrays (their keys share k0), for the tensor's
// elements [offset, offset + n) (offset a multiple of kMixedBlock). `first`
// has room for kSrHalf.
inline void sr_block_first(uint32_t k0, int64_t offset, uint32_t* first, int64_t n) {
  const uint32_t word0 = precision::sr_word(static_cast<uint32_t>(offset));
  const int64_t words = std::min(n, kSrHalf);
  for (int64_t p = 0; p < words; ++p) first[p] = precision::sr_pair_first(k0, word0 + static_cast<uint32_t>(p));
}

// Calls f(j, r) for each element j < n of a block with its random bits r
// (precision.h: sr_bits' form, 16 bits in the high half), under `block_key`
// (sr_key_high's for the block) and `first` (sr_block_first's): element p and
// p + kSrHalf from the low and high halves of one hash.
template <typename F>
void for_each_sr_bits(precision::SrKey block_key, const uint32_t* first, int64_t n, F&& f) {
  const int64_t low_n = std::min(n, kSrHalf), high_n = n - low_n;
  for (int64_t p = 0; p < high_n; ++p) {
    const uint32_t h = precision::sr_pair_second(block_key, first[p]);
    f(p, h << 16);
    f(kSrHalf + p, h & 0xffff0000u);
  }
  for (int64_t p = high_n; p < low_n; ++p) {
    f(p, precision::sr_pair_second(block_key, first[p]) << 16);
  }
}

// n float32 values stored as bfloat16/float16, rounded stochastically with the
// random bits of the tensor's elements [offset, offset + n) under `key`
// (`first`: sr_block_first's; a block never crosses a multiple of 2^32
// elements).
inline void narrow_sr(float* src, void* dst, Storage d, precision::SrKey key, int64_t offset,
                      const uint32_t* first, int64_t n) {
  const precision::SrKey block_key = precision::sr_key_high(key, offset);
  if (d == Storage::BF16) {
    uint16_t* out = reinterpret_cast<uint16_t*>(static_cast<at::BFloat16*>(dst) + offset);
    for_each_sr_bits(block_key, first, n, [&](int64_t j, uint32_t r) {
      out[j] = precision::sr_bf16(precision::float_bits(src[j]), r);
    });
  } else {
    for_each_sr_bits(block_key, first, n, [&](int64_t j, uint32_t r) {
      src[j] = precision::sr_fp16_grid(src[j], r);
    });
    narrow(src, static_cast<at::Half*>(dst) + offset, n);  // exact: on the fp16 grid
  }
}

// Stores n float32 values of a non-float32 array: stochastically where
// `first` (sr_block_first's) is given, else rounded to nearest even.
inline void narrow_any(float* src, void* dst, Storage d, const uint32_t* first,
                       precision::SrKey key, int64_t offset, int64_t n) {
  if (first != nullptr) {
    narrow_sr(src, dst, d, key, offset, first, n);
  } else if (d == Storage::BF16) {
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
