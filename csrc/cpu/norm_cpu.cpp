// CPU kernel of fusedclip::multi_tensor_norm: one read of every tensor gives
// per-tensor norms, the global norm and the non-finite flag. Each chunk is
// reduced on its own and the chunk results are summed in a fixed order, so the
// result does not depend on the number of threads.
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "capability.h"
#include "../checks.h"
#include "../flat_tensors.h"
#include "fusedclip/norm_math.h"
#include "kernels.h"
#include "lanes.h"
#include "multi_tensor.h"
#include "vec_traits.h"

namespace fusedclip::cpu {
inline namespace CPU_CAPABILITY {  // capability.h
namespace {

// Independent accumulators, so additions of consecutive steps do not wait on
// each other.
constexpr int kAccumulators = 4;

// The norm passes read in chunks of 256 KiB, whatever the dtype, so each of a
// chunk's four streams (reduce_chunk) walks 64 KiB: streams of a few pages let
// the hardware prefetcher ramp up too rarely. Against chunks of 16K elements,
// standalone loops of 2 threads ran 4% (float32) and 23% (bfloat16) faster on
// an AMD EPYC; on a Xeon 64K float32 elements measured 4-6% faster.
constexpr int64_t kNormChunkBytes = 256 * 1024;

int64_t norm_chunk_size(const at::TensorList& tensors) {
  return tensors.empty() ? kChunkSize : kNormChunkBytes / tensors[0].element_size();
}

// How a reduction walks its range with its four accumulators:
//  - Quarters: each accumulator walks its own quarter. Four memory streams per
//    thread keep more cache-line fetches in flight than one, which a read-only
//    pass over long ranges needs to approach the bandwidth an update pass (four
//    arrays) gets (measured: about 1.2x the GB/s of one stream, 2 threads).
//  - Interleaved: consecutive vectors go to the accumulators in turn, one
//    stream. For the short runs of per-unit norms (a row of a few hundred
//    elements): a chunk's runs then make one long stream, where quarters of
//    each would be many streams of a few lines that the prefetcher never
//    follows (GPT-2 small's unit norms: 2.9x the time of its plain norm pass
//    with quarters).
enum class Walk { Quarters, Interleaved };

// The tensors of a norm op as flat arrays: a tensor's own memory where it can
// be read as it lies (any dense layout; row-major only where `row_major`),
// else a contiguous copy, kept alive here. No copies of the tensors
// themselves: a list of a thousand small ones costs no reference counting.
struct FlatInputs {
  std::vector<const void*> data;
  std::vector<int64_t> numels;
  int64_t total_numel = 0;
  std::vector<at::Tensor> stand_ins;

  FlatInputs(at::TensorList tensors, bool row_major) {
    data.reserve(tensors.size());
    numels.reserve(tensors.size());
    for (const at::Tensor& t : tensors) {
      if (walkable_first(t, row_major)) {
        data.push_back(t.const_data_ptr());
      } else {
        stand_ins.push_back(t.contiguous());
        data.push_back(stand_ins.back().const_data_ptr());
      }
      numels.push_back(t.numel());
      total_numel += t.numel();
    }
  }
};

template <typename scalar_t, bool MAX_ABS, Walk WALK = Walk::Quarters>
double reduce_chunk(const scalar_t* x, int64_t n) {
  using L = Lanes<scalar_t>;
  using OpVec = typename L::OpVec;
  using opmath_t = typename L::opmath_t;
  OpVec acc[kAccumulators][L::kParts];
  for (auto& a : acc)
    for (auto& part : a) part = OpVec(opmath_t(0));
  OpVec v[L::kParts];
  auto accumulate = [&](OpVec* a) {
    for (int k = 0; k < L::kParts; ++k) a[k] = norm_accumulate<MAX_ABS>(a[k], v[k]);
  };
  // Elements each accumulator takes in whole vectors; the tail goes to acc[0].
  const int64_t quarter = (n / (kAccumulators * L::kWidth)) * L::kWidth;
  const Prefetch prefetch;
  for (int64_t j = 0; j < quarter; j += L::kWidth) {
    for (int a = 0; a < kAccumulators; ++a) {
      const scalar_t* at = WALK == Walk::Quarters ? x + a * quarter + j
                                                  : x + kAccumulators * j + a * L::kWidth;
      prefetch.to_read(at);
      L::load(at, L::kWidth, v);
      accumulate(acc[a]);
    }
  }
  for (int64_t i = kAccumulators * quarter; i < n; i += L::kWidth) {  // the tail; a partial load fills zeros
    L::load(x + i, std::min<int64_t>(L::kWidth, n - i), v);
    accumulate(acc[0]);
  }
  // A chunk of 256 KiB sums the lanes of every accumulator in double: it can
  // afford that, and float16/bfloat16 squares so summed are close to exact,
  // whatever order a dense layout is read in. A unit's run of a few hundred
  // elements cannot afford 64 or 128 scalar adds: its accumulators are first
  // combined lane by lane in opmath_t, a few more roundings of partial sums,
  // far below the tolerance of a norm.
  double result = 0.0;
  auto add_lanes = [&](const OpVec& vec) {
    opmath_t lanes[OpVec::size()];
    vec.store(lanes);
    for (opmath_t lane : lanes) result = norm_combine<MAX_ABS>(result, static_cast<double>(lane));
  };
  if constexpr (WALK == Walk::Quarters) {
    for (auto& a : acc)
      for (auto& part : a) add_lanes(part);
  } else {
    OpVec total = acc[0][0];
    for (int a = 0; a < kAccumulators; ++a) {
      for (int k = 0; k < L::kParts; ++k) {
        if (a == 0 && k == 0) continue;
        total = norm_combine<MAX_ABS>(total, acc[a][k]);
      }
    }
    add_lanes(total);
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_tensor_norm_cpu(
    at::TensorList tensors, double norm_type) {
  check_norm_args(tensors, norm_type);
  const bool max_abs = std::isinf(norm_type);
  const auto out_dtype = (!tensors.empty() && tensors[0].scalar_type() == at::kDouble)
                             ? at::kDouble : at::kFloat;
  const int64_t n = static_cast<int64_t>(tensors.size());

  // Order does not matter for a norm: any dense layout is read as it lies.
  const FlatInputs in(tensors, /*row_major=*/false);
  const std::vector<Chunk> chunks = make_chunks(in.numels, norm_chunk_size(tensors));
  std::vector<double> partial(chunks.size(), 0.0);

  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "multi_tensor_norm_cpu",
        [&] {
          for_each_chunk(chunks, in.total_numel, [&](int64_t c) {
            const Chunk& ch = chunks[c];
            const scalar_t* x = static_cast<const scalar_t*>(in.data[ch.tensor]) + ch.begin;
            partial[c] = max_abs ? reduce_chunk<scalar_t, true>(x, ch.end - ch.begin)
                                 : reduce_chunk<scalar_t, false>(x, ch.end - ch.begin);
          });
        });
  }

  auto combine = [max_abs](double acc, double value) {
    return max_abs ? norm_combine<true>(acc, value) : norm_combine<false>(acc, value);
  };
  auto finish = [max_abs](double value) {
    return max_abs ? norm_finish<true>(value) : norm_finish<false>(value);
  };
  // Chunks come tensor by tensor, in order: a fixed summation order.
  std::vector<double> per_tensor(n, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    double& acc = per_tensor[chunks[c].tensor];
    acc = combine(acc, partial[c]);
  }
  double total = 0.0;
  for (double& value : per_tensor) {
    total = combine(total, value);
    value = finish(value);
  }
  total = finish(total);

  auto options = at::TensorOptions().dtype(out_dtype).device(at::kCPU);
  at::Tensor tensor_norms = at::empty({n}, options);
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "multi_tensor_norm_cpu_out", [&] {
    scalar_t* out = tensor_norms.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(per_tensor[i]);
  });
  at::Tensor total_norm = at::scalar_tensor(total, options);
  // The flag looks at the norm as returned, in its dtype: a float32 norm that
  // overflows counts as non-finite, as it would for clip_grad_norm_.
  const double returned = total_norm.item<double>();
  at::Tensor nonfinite = at::scalar_tensor(std::isfinite(returned) ? 0.0 : 1.0,
                                           options.dtype(at::kFloat));
  return {tensor_norms, total_norm, nonfinite};
}

// One unit's run of a chunk, walked as one stream (Walk::Interleaved). A
// short run (a unit of a few elements) is summed one element at a time:
// reduce_chunk's vector accumulators and their lane sums would cost more.
template <typename scalar_t>
double reduce_run(const scalar_t* x, int64_t n, bool max_abs) {
  using L = Lanes<scalar_t>;
  if (n >= 4 * L::kWidth) {
    return max_abs ? reduce_chunk<scalar_t, true, Walk::Interleaved>(x, n)
                   : reduce_chunk<scalar_t, false, Walk::Interleaved>(x, n);
  }
  using opmath_t = typename L::opmath_t;
  opmath_t acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t v = static_cast<opmath_t>(x[i]);
    acc = max_abs ? norm_accumulate<true>(acc, v) : norm_accumulate<false>(acc, v);
  }
  return static_cast<double>(acc);
}

// multi_tensor_unit_norm: one read of every tensor gives the norm of each unit
// (an index of dim 0: a row-major run of numel / size(0) elements; the whole
// tensor for ndim <= 1), of each tensor and of all, and the non-finite flag.
// Each chunk is split at unit boundaries; a chunk writes one partial per unit
// it touches into its own slots, and the partials are combined afterwards in
// chunk order, so the result does not depend on the number of threads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_tensor_unit_norm_cpu(
    at::TensorList tensors, double norm_type) {
  check_norm_args(tensors, norm_type);
  const bool max_abs = std::isinf(norm_type);
  const auto out_dtype = (!tensors.empty() && tensors[0].scalar_type() == at::kDouble)
                             ? at::kDouble : at::kFloat;
  const int64_t n = static_cast<int64_t>(tensors.size());

  const FlatInputs in(tensors, /*row_major=*/true);  // units are row-major runs
  std::vector<int64_t> unit_len, unit_offset;  // unit_offset: first unit of each tensor
  int64_t total_units = 0;
  for (const at::Tensor& t : tensors) {
    unit_len.push_back(unit_length(t));
    unit_offset.push_back(total_units);
    total_units += num_units(t);
  }
  const std::vector<Chunk> chunks = make_chunks(in.numels, norm_chunk_size(tensors));
  // Slots of each chunk: one per unit it touches.
  std::vector<int64_t> slot(chunks.size() + 1, 0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    const Chunk& ch = chunks[c];
    const int64_t len = unit_len[ch.tensor];
    slot[c + 1] = slot[c] + (ch.end - 1) / len - ch.begin / len + 1;
  }
  std::vector<double> partial(slot.back(), 0.0);

  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "multi_tensor_unit_norm_cpu",
        [&] {
          for_each_chunk(chunks, in.total_numel, [&](int64_t c) {
            const Chunk& ch = chunks[c];
            const scalar_t* x = static_cast<const scalar_t*>(in.data[ch.tensor]);
            const int64_t len = unit_len[ch.tensor];
            int64_t k = slot[c];
            for (int64_t run = ch.begin; run < ch.end; ++k) {
              const int64_t run_end = std::min(ch.end, (run / len + 1) * len);
              partial[k] = reduce_run<scalar_t>(x + run, run_end - run, max_abs);
              run = run_end;
            }
          });
        });
  }

  auto combine = [max_abs](double acc, double value) {
    return max_abs ? norm_combine<true>(acc, value) : norm_combine<false>(acc, value);
  };
  // Units in chunk order: a fixed combination order.
  std::vector<double> per_unit(total_units, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    const Chunk& ch = chunks[c];
    const int64_t first = unit_offset[ch.tensor] + ch.begin / unit_len[ch.tensor];
    for (int64_t k = slot[c]; k < slot[c + 1]; ++k) {
      double& acc = per_unit[first + (k - slot[c])];
      acc = combine(acc, partial[k]);
    }
  }
  std::vector<double> per_tensor(n, 0.0);
  double total = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t end = t + 1 < n ? unit_offset[t + 1] : total_units;
    for (int64_t u = unit_offset[t]; u < end; ++u) per_tensor[t] = combine(per_tensor[t], per_unit[u]);
    total = combine(total, per_tensor[t]);
  }
  auto finish = [max_abs](double value) {
    return max_abs ? norm_finish<true>(value) : norm_finish<false>(value);
  };
  total = finish(total);

  auto options = at::TensorOptions().dtype(out_dtype).device(at::kCPU);
  at::Tensor unit_norms = at::empty({total_units}, options);
  at::Tensor tensor_norms = at::empty({n}, options);
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "multi_tensor_unit_norm_cpu_out", [&] {
    scalar_t* out = unit_norms.data_ptr<scalar_t>();
    for (int64_t u = 0; u < total_units; ++u) out[u] = static_cast<scalar_t>(finish(per_unit[u]));
    out = tensor_norms.data_ptr<scalar_t>();
    for (int64_t t = 0; t < n; ++t) out[t] = static_cast<scalar_t>(finish(per_tensor[t]));
  });
  at::Tensor total_norm = at::scalar_tensor(total, options);
  const double returned = total_norm.item<double>();
  at::Tensor nonfinite = at::scalar_tensor(std::isfinite(returned) ? 0.0 : 1.0,
                                           options.dtype(at::kFloat));
  return {unit_norms, tensor_norms, total_norm, nonfinite};
}

}  // namespace

// This vector set's norm kernels, for dispatch.cpp (kernels.h).
void add_norm_kernels(CpuKernels& kernels) {
  kernels.norm = &multi_tensor_norm_cpu;
  kernels.unit_norm = &multi_tensor_unit_norm_cpu;
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
