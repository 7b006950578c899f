// The roundings of the mixed-precision steps (issue 20), shared by the CPU and
// CUDA drivers: torch-free, host and device. Every function works on the bits
// of a float32 (uint32_t); the results are float32 values that lie on the
// target's grid (or are NaN/inf), so that any round-to-nearest conversion to
// bfloat16/float16 (c10's, ATen's vectorized one, __float2bfloat16_rn) turns
// them into the target exactly.
//
//   - Master weights: an fp32 master and the bf16 parameter rounded from it to
//     nearest, ties AWAY from zero (bf16_round_half_away); the master's low 16
//     bits, as an int16 "remainder", rebuild it exactly from the parameter
//     (bf16_remainder, bf16_rebuild). Round-half-even could not: it maps two
//     masters to one (parameter, low bits) pair. fp16 parameters of an fp32
//     master are rounded to nearest even (an ordinary conversion).
//   - Stochastic rounding (sr_bf16_grid, sr_fp16_grid): rounded up with
//     probability equal to the distance from the lower neighbour over the gap,
//     from the random bits r (sr_bits: 16, the high half of r).
//   - The random bits: counter based and keyed (sr_key, sr_bits): no state
//     beyond a [seed, counter] pair per parameter; element `index` of array
//     `slot` (0 the parameter, 1 + k state k) gets the same bits whatever the
//     thread count or chunking: 16 per element, half of one hash shared by a
//     pair of elements (sr_word, sr_pair_bits).
#pragma once

#include <math.h>
#include <stdint.h>

#include "fusedclip/macros.h"

// The host branches below use std::memcpy, also in a .cu file's host code.
#include <cstring>

namespace fusedclip {

// The storage of one element array of a mixed call (param, grad, a state),
// as both drivers describe it: float32, bfloat16 or float16.
enum class Storage : uint8_t { F32, BF16, F16 };

FC_HOST_DEVICE constexpr int storage_bytes(Storage s) { return s == Storage::F32 ? 4 : 2; }

// Where a parameter's float32 value comes from and goes to in a mixed call:
// the parameter itself (None), a full float32 master (the parameter written
// from it, rounded to nearest), or the master's low 16 bits beside a
// bfloat16 parameter (bf16_rebuild).
enum class MasterKind : uint8_t { None, Full, Remainder };

// The bytes of one element of a master array (MasterKind::None has none).
FC_HOST_DEVICE constexpr int master_bytes(MasterKind m) { return m == MasterKind::Full ? 4 : 2; }

namespace precision {

FC_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FC_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

FC_HOST_DEVICE bool bits_are_nan(uint32_t m) { return (m & 0x7fffffffu) > 0x7f800000u; }

// --- bf16 from an fp32 master: nearest, ties away from zero ----------------------

// The bf16 bits of `m` (fp32 bits) rounded to nearest, ties away from zero;
// NaN gives a quiet NaN. Finite values past the largest bf16 give inf.
FC_HOST_DEVICE uint16_t bf16_round_half_away(uint32_t m) {
  if (bits_are_nan(m)) return static_cast<uint16_t>((m >> 16) | 0x0040u);
  return static_cast<uint16_t>((m + 0x8000u) >> 16);
}

// The same, as a float32 on the bf16 grid (its low 16 bits zero; NaN stays NaN).
FC_HOST_DEVICE float bf16_round_half_away_grid(float master) {
  const uint32_t m = float_bits(master);
  if (bits_are_nan(m)) return master;
  return bits_float((m + 0x8000u) & 0xffff0000u);
}

// The low 16 bits of `m` that rebuild it from bf16_round_half_away(m): a
// signed offset from (param << 16), in [-0x8000, 0x7fff]; 0 for NaN.
FC_HOST_DEVICE int16_t bf16_remainder(uint32_t m) {
  if (bits_are_nan(m)) return 0;
  return static_cast<int16_t>(static_cast<uint16_t>(m & 0xffffu));
}

// The fp32 master (bits) of a bf16 parameter (bits) and its remainder.
FC_HOST_DEVICE uint32_t bf16_rebuild(uint16_t param, int16_t remainder) {
  return (static_cast<uint32_t>(param) << 16) +
         static_cast<uint32_t>(static_cast<int32_t>(remainder));
}

// --- stochastic rounding ----------------------------------------------------------

// x rounded to bf16 stochastically with the random bits r, as a float32 on the
// bf16 grid: bits(x) + (r >> 16), truncated to the high 16 bits. NaN stays
// NaN, inf stays inf, a bf16 value stays itself.
FC_HOST_DEVICE float sr_bf16_grid(float x, uint32_t r) {
  const uint32_t m = float_bits(x);
  if (bits_are_nan(m)) return x;
  return bits_float((m + (r >> 16)) & 0xffff0000u);
}

// The same as bf16 bits, from the bits m of x.
FC_HOST_DEVICE uint16_t sr_bf16(uint32_t m, uint32_t r) {
  if (bits_are_nan(m)) return static_cast<uint16_t>((m >> 16) | 0x0040u);
  return static_cast<uint16_t>((m + (r >> 16)) >> 16);
}

// x rounded to fp16 stochastically with the random bits r, as a float32 on the
// fp16 grid (or past its largest value, which a round-to-nearest conversion
// makes inf): with ulp the fp16 spacing at |x| (2^(e - 10), e = max(floor(log2
// |x|), -14)) and q = |x| / ulp (exact), (floor(q) + (u < q - floor(q))) *
// ulp, u = (r >> 8) * 2^-24, the sign kept. NaN and inf stay themselves, as
// does every fp16 value.
FC_HOST_DEVICE float sr_fp16_grid(float x, uint32_t r) {
  // Branch free, so that a loop of it vectorizes: NaN and inf (biased
  // exponent 0xff) are selected at the end.
  const uint32_t m = float_bits(x);
  const uint32_t biased = (m >> 23) & 0xffu;  // float32's biased exponent
  int e = static_cast<int>(biased) - 127;     // floor(log2|x|) for normal x
  e = e < -14 ? -14 : e;                      // fp16's subnormal spacing
  const float ulp = bits_float(static_cast<uint32_t>(e - 10 + 127) << 23);
  const float inv_ulp = bits_float(static_cast<uint32_t>(10 - e + 127) << 23);
  // q = |x| / ulp, exact (a power of two), below 2^11; 0 for NaN and inf
  // (selected by bits: GCC does not if-convert a float expression).
  const uint32_t special = biased == 0xffu ? 0xffffffffu : 0u;
  const float q = bits_float(float_bits(bits_float(m & 0x7fffffffu) * inv_ulp) & ~special);
  const float whole = static_cast<float>(static_cast<int32_t>(q));  // floor: q >= 0
  const float u = static_cast<float>(r >> 8) * 5.9604644775390625e-8f;  // 2^-24, exact
  const uint32_t up = (u < q - whole) ? 0x3f800000u : 0u;  // 1.0f or 0
  const float magnitude = (whole + bits_float(up)) * ulp;  // exact (<= 2^11 * ulp)
  const uint32_t rounded = float_bits(magnitude) | (m & 0x80000000u);
  return bits_float((rounded & ~special) | (m & special));
}

// --- the random bits --------------------------------------------------------------

FC_HOST_DEVICE uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

FC_HOST_DEVICE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// The key of one array of one call: its parameter's [seed, counter] (the
// counter before this call's increment) and its slot (0 the parameter,
// 1 + k state k).
struct SrKey {
  uint32_t k0, k1;
};

// k0 is the call's (seed and counter), the same for every slot: the first
// hash round (sr_pair_first) of an element pair is shared by all the arrays of
// its tensor, which then differ by their k1 in the second (sr_pair_second).
FC_HOST_DEVICE SrKey sr_key(int64_t seed, int64_t counter, int slot) {
  uint64_t z = splitmix64(static_cast<uint64_t>(seed));
  z = splitmix64(z ^ static_cast<uint64_t>(counter));
  const uint32_t k0 = static_cast<uint32_t>(z);
  z = splitmix64(z ^ static_cast<uint64_t>(slot));
  return {k0, static_cast<uint32_t>(z >> 32)};
}

// The key of the elements whose index has the high 32 bits of `index`: k1
// mixed with them (k1 itself below 2^32).
FC_HOST_DEVICE SrKey sr_key_high(SrKey key, int64_t index) {
  return {key.k0, key.k1 ^ lowbias32(static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32))};
}

// The random bits: 16 per element, half of a 32-bit hash that a pair of
// elements shares. In every span of 512 elements (aligned: element s * 512 + j
// of a 2^32-element range, the high 32 bits of the index in high_key), the
// elements j and j + 256 (j < 256) share word s * 256 + j: its low half is
// element j's, its high half element j + 256's (a block loop over 512
// elements reads both halves without shuffles). Sixteen bits are all that
// stochastic rounding to bfloat16 reads (r >> 16), and they make the rounding
// to float16 exact wherever the result is a normal float16 (float32 keeps 13
// bits below its spacing); below, its probabilities are multiples of 2^-16.
// The hash of a word: two lowbias32 rounds, keyed by k0 (the call's: seed
// and counter, the same for every array) before the first and k1 (the
// array's) before the second, so that the arrays of one tensor share the
// first round. Before: two rounds per element and array, most of the CPU's
// stochastic-rounding cost.
FC_HOST_DEVICE uint32_t sr_word(uint32_t low) { return ((low >> 9) << 8) | (low & 0xffu); }

FC_HOST_DEVICE uint32_t sr_pair_first(uint32_t k0, uint32_t word) {
  return lowbias32(word ^ k0);
}
FC_HOST_DEVICE uint32_t sr_pair_second(SrKey high_key, uint32_t first) {
  return lowbias32(first ^ high_key.k1);
}
FC_HOST_DEVICE uint32_t sr_pair_bits(SrKey high_key, uint32_t word) {
  return sr_pair_second(high_key, sr_pair_first(high_key.k0, word));
}

// The bits of the element whose index has the low 32 bits `low`, under the
// key sr_key_high gave for its high bits: its 16 bits of its word, as the
// high half of a uint32 (the low half zero).
FC_HOST_DEVICE uint32_t sr_bits_low(SrKey high_key, uint32_t low) {
  const uint32_t h = sr_pair_bits(high_key, sr_word(low));
  return (low & 0x100u) != 0 ? (h & 0xffff0000u) : (h << 16);
}

// The random bits of element `index` (its flat index in the array the kernel
// walks) of the array keyed `key`: 16 bits, the high half of the result (the
// low half zero), from h = lowbias32(lowbias32(w ^ k0) ^ k1 ^
// lowbias32(high32(index))), w = sr_word(low32(index)): h's low half where
// bit 8 of the index is clear, its high half where set.
FC_HOST_DEVICE uint32_t sr_bits(SrKey key, int64_t index) {
  return sr_bits_low(sr_key_high(key, index),
                     static_cast<uint32_t>(static_cast<uint64_t>(index)));
}

}  // namespace precision
}  // namespace fusedclip
