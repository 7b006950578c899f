// CUDA kernel of fusedclip::multi_tensor_norm: one read of every tensor gives
// per-tensor norms, the global norm and the non-finite flag, with the CPU
// kernel's semantics (cpu/norm_cpu.cpp), without a host sync.
//
// Deterministic, with no floating-point atomics, in three launches:
//   1. multi_tensor_apply: one block per (tensor, chunk) writes the chunk's sum
//      of squares (or max |x|) to partials[global chunk index]. The block of a
//      tensor's chunk 0 also writes where the tensor's partials lie.
//   2. one block per tensor reduces that tensor's partials.
//   3. one block reduces the per-tensor values to the global norm and writes
//      total_norm and nonfinite.
// Every reduction runs in an order fixed by the launch shape, so the same
// inputs give the same bits on every run (not the same bits as the CPU kernel,
// whose summation order differs).
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedclip/norm_math.h"
#include "multi_tensor_apply.cuh"

namespace fusedclip::cuda {
namespace {

// Threads of the per-tensor stage: most tensors have only a few chunks.
constexpr int kPerTensorThreads = 128;
// Threads of the final stage (one block).
constexpr int kTotalThreads = 512;

// The shared norm arithmetic (include/fusedclip/norm_math.h): combine two
// partials, the larger (NaN wins) or their sum.
template <bool MAX_ABS>
__device__ __forceinline__ double combine(double a, double b) {
  return norm_combine<MAX_ABS>(a, b);
}

// Sum (or max) over the block in a fixed tree: within each warp by shuffles,
// then across warps in warp 0. The result is valid in thread 0. blockDim.x must
// be a multiple of 32 and at most kBlockSize; call once per kernel (the shared
// buffer is not synchronised for reuse). 0 is the neutral value of both
// reductions (the values are squares or magnitudes).
template <bool MAX_ABS>
__device__ double block_reduce(double value) {
  __shared__ double warp_values[kBlockSize / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value = combine<MAX_ABS>(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  if (lane == 0) warp_values[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / 32) ? warp_values[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      value = combine<MAX_ABS>(value, __shfl_down_sync(0xffffffffu, value, offset));
    }
  }
  return value;
}

// Stage 1: the partial of one chunk. Each thread accumulates its elements in
// the math type (float for float32/half/bfloat16, as the CPU lanes do; double
// for float64); the block combines the threads' values in double.
template <typename scalar_t, bool MAX_ABS>
struct NormPartialFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  double* partials;       // one per chunk of the call, in chunk order
  int64_t* tensor_chunks; // [n][2]: first chunk in partials, number of chunks

  __device__ __forceinline__ void operator()(const TensorListMetadata<1>& meta,
                                             const ChunkRef& c) const {
    scalar_t* const x[1] = {static_cast<scalar_t*>(meta.addresses[0][c.slot]) + c.begin};
    opmath_t acc = 0;
    chunk_foreach<scalar_t, 1, 0u>(x, c.size, [&](opmath_t(&v)[1], int) {
      acc = norm_accumulate<MAX_ABS>(acc, v[0]);
    });
    const double total = block_reduce<MAX_ABS>(static_cast<double>(acc));
    if (threadIdx.x == 0) {
      partials[c.global_block] = total;
      if (c.chunk == 0) {
        tensor_chunks[2 * c.tensor] = c.global_block;
        tensor_chunks[2 * c.tensor + 1] =
            (meta.numel[c.slot] + meta.chunk_size - 1) / meta.chunk_size;
      }
    }
  }
};

// Stage 2: one block per tensor. Empty tensors kept the zeroed row of
// tensor_chunks (no chunks) and come out as 0.
template <bool MAX_ABS, typename out_t>
__global__ void __launch_bounds__(kPerTensorThreads)
    norm_per_tensor_kernel(const double* partials, const int64_t* tensor_chunks,
                           double* per_tensor, out_t* tensor_norms) {
  const int64_t t = blockIdx.x;
  const int64_t first = tensor_chunks[2 * t];
  const int64_t count = tensor_chunks[2 * t + 1];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    acc = combine<MAX_ABS>(acc, partials[first + i]);
  }
  acc = block_reduce<MAX_ABS>(acc);
  if (threadIdx.x == 0) {
    per_tensor[t] = acc;
    tensor_norms[t] = static_cast<out_t>(norm_finish<MAX_ABS>(acc));
  }
}

// Stage 3: the global norm, from the per-tensor sums of squares (not from the
// rounded per-tensor norms), as the CPU kernel does.
template <bool MAX_ABS, typename out_t>
__global__ void __launch_bounds__(kTotalThreads)
    norm_total_kernel(const double* per_tensor, int64_t n, out_t* total_norm,
                      float* nonfinite) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    acc = combine<MAX_ABS>(acc, per_tensor[i]);
  }
  acc = block_reduce<MAX_ABS>(acc);
  if (threadIdx.x == 0) {
    const out_t total = static_cast<out_t>(norm_finish<MAX_ABS>(acc));
    *total_norm = total;
    // The flag looks at the norm as returned, in its dtype: a float32 norm
    // that overflows counts as non-finite.
    *nonfinite = isfinite(static_cast<double>(total)) ? 0.0f : 1.0f;
  }
}

template <bool MAX_ABS, typename out_t>
void launch_norm_stages_2_3(const double* partials, const int64_t* tensor_chunks,
                            double* per_tensor, int64_t n, at::Tensor& tensor_norms,
                            at::Tensor& total_norm, at::Tensor& nonfinite) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(),
              "fusedclip: multi_tensor_norm takes at most 2^31 - 1 tensors, got ", n);
  norm_per_tensor_kernel<MAX_ABS, out_t>
      <<<static_cast<unsigned int>(n), kPerTensorThreads, 0, stream>>>(
      partials, tensor_chunks, per_tensor, tensor_norms.data_ptr<out_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  norm_total_kernel<MAX_ABS, out_t><<<1, kTotalThreads, 0, stream>>>(
      per_tensor, n, total_norm.data_ptr<out_t>(), nonfinite.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_tensor_norm_cuda(
    at::TensorList tensors, double norm_type) {
  check_norm_args(tensors, norm_type);
  const bool max_abs = std::isinf(norm_type);
  const int64_t n = static_cast<int64_t>(tensors.size());
  if (n == 0) {
    // Nothing to read: the norms of no tensors, on the current device.
    auto options = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
    return {at::zeros({0}, options), at::zeros({}, options), at::zeros({}, options)};
  }
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  const at::ScalarType out_dtype =
      tensors[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = at::TensorOptions().device(tensors[0].device());

  std::vector<at::Tensor> dense;  // alive until the launches are queued
  std::vector<TensorRef<1>> refs;
  dense.reserve(n);
  refs.reserve(n);
  int64_t total_chunks = 0;
  for (const at::Tensor& t : tensors) {
    // Order does not matter for a norm: any dense layout is read as it lies.
    dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
    refs.push_back({{const_cast<void*>(dense.back().const_data_ptr())}, t.numel()});
    total_chunks += (t.numel() + kChunkSize - 1) / kChunkSize;
  }

  // partials (one per chunk) followed by the per-tensor values.
  at::Tensor work = at::empty({total_chunks + n}, options.dtype(at::kDouble));
  // Zeros: an empty tensor gets no block, so its row must already say "no chunks".
  at::Tensor tensor_chunks = at::zeros({n, 2}, options.dtype(at::kLong));
  at::Tensor tensor_norms = at::empty({n}, options.dtype(out_dtype));
  at::Tensor total_norm = at::empty({}, options.dtype(out_dtype));
  at::Tensor nonfinite = at::empty({}, options.dtype(at::kFloat));
  double* partials = work.data_ptr<double>();
  double* per_tensor = partials + total_chunks;
  int64_t* chunks_ptr = tensor_chunks.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "multi_tensor_norm_cuda", [&] {
        if (max_abs) {
          multi_tensor_apply<1>(refs, NormPartialFunctor<scalar_t, true>{partials, chunks_ptr});
        } else {
          multi_tensor_apply<1>(refs, NormPartialFunctor<scalar_t, false>{partials, chunks_ptr});
        }
      });
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "multi_tensor_norm_cuda_out", [&] {
    if (max_abs) {
      launch_norm_stages_2_3<true, scalar_t>(partials, chunks_ptr, per_tensor, n,
                                             tensor_norms, total_norm, nonfinite);
    } else {
      launch_norm_stages_2_3<false, scalar_t>(partials, chunks_ptr, per_tensor, n,
                                              tensor_norms, total_norm, nonfinite);
    }
  });
  return {tensor_norms, total_norm, nonfinite};
}

// ---------------------------------------------------------------------------
// multi_tensor_unit_norm: the same three stages, with units in place of chunks.
// A unit is a row of a contiguous tensor (unit_len elements; the whole tensor
// for ndim <= 1). Stage 1 runs over units: the launcher's "elements" are the
// units of each tensor, a block takes kUnitsPerBlock of them and each warp sums
// one unit (its lanes stride over the row, coalesced), writing the unit's sum
// of squares (or max |x|) to unit_sums. Stages 2 and 3 are the kernels above,
// reading unit sums where they read chunk partials; a last launch writes the
// unit norms. Deterministic as the chunk version is. A unit is one warp's work,
// so a tensor with few, very long rows is read by few warps.
constexpr int kUnitsPerBlock = kBlockSize / 32;  // a multiple of 16, as chunks must be
static_assert(kUnitsPerBlock % 16 == 0, "unit chunks must be a multiple of 16");

// Per tensor: its data and its units' sums (element arrays), and its unit length.
enum UnitNormArray { kUnitData, kUnitSums };
struct UnitLength {
  int64_t unit_len;  // elements per unit
};

template <bool MAX_ABS>
__device__ __forceinline__ double warp_reduce(double value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value = combine<MAX_ABS>(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  return value;
}

template <typename scalar_t, bool MAX_ABS>
struct UnitNormFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  double* unit_sums_base;  // all units of the call
  int64_t* tensor_units;   // [n][2]: first unit in unit_sums, number of units

  __device__ __forceinline__ void operator()(const TensorListMetadata<2, UnitLength>& meta,
                                             const ChunkRef& c) const {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int64_t unit_len = meta.extra[c.slot].unit_len;
    double* sums = static_cast<double*>(meta.addresses[kUnitSums][c.slot]);
    if (warp < c.size) {
      const int64_t u = c.begin + warp;
      const scalar_t* x = static_cast<const scalar_t*>(meta.addresses[kUnitData][c.slot]) +
                          u * unit_len;
      opmath_t acc = 0;
      for (int64_t i = lane; i < unit_len; i += 32) {
        const opmath_t v = static_cast<opmath_t>(x[i]);
        acc = norm_accumulate<MAX_ABS>(acc, v);
      }
      const double total = warp_reduce<MAX_ABS>(static_cast<double>(acc));
      if (lane == 0) sums[u] = total;
    }
    if (c.chunk == 0 && threadIdx.x == 0) {
      tensor_units[2 * c.tensor] = sums - unit_sums_base;
      tensor_units[2 * c.tensor + 1] = meta.numel[c.slot];
    }
  }
};

template <bool MAX_ABS, typename out_t>
__global__ void unit_norm_out_kernel(const double* unit_sums, int64_t units, out_t* out) {
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[u] = static_cast<out_t>(norm_finish<MAX_ABS>(unit_sums[u]));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_tensor_unit_norm_cuda(
    at::TensorList tensors, double norm_type) {
  check_norm_args(tensors, norm_type);
  const bool max_abs = std::isinf(norm_type);
  const int64_t n = static_cast<int64_t>(tensors.size());
  if (n == 0) {
    auto options = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
    return {at::zeros({0}, options), at::zeros({0}, options), at::zeros({}, options),
            at::zeros({}, options)};
  }
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  const at::ScalarType out_dtype =
      tensors[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = at::TensorOptions().device(tensors[0].device());

  int64_t total_units = 0;
  for (const at::Tensor& t : tensors) total_units += num_units(t);
  // unit sums followed by the per-tensor values.
  at::Tensor work = at::empty({total_units + n}, options.dtype(at::kDouble));
  double* unit_sums = work.data_ptr<double>();
  double* per_tensor = unit_sums + total_units;

  std::vector<at::Tensor> dense;  // alive until the launches are queued
  std::vector<TensorRef<2, UnitLength>> refs;
  dense.reserve(n);
  refs.reserve(n);
  int64_t offset = 0;
  for (const at::Tensor& t : tensors) {
    dense.push_back(t.contiguous());  // units are row-major runs
    refs.push_back({{const_cast<void*>(dense.back().const_data_ptr()), unit_sums + offset},
                    num_units(t), UnitLength{unit_length(t)}});
    offset += num_units(t);
  }

  // Zeros: a tensor without units gets no block, so its row must say "none".
  at::Tensor tensor_units = at::zeros({n, 2}, options.dtype(at::kLong));
  at::Tensor unit_norms = at::empty({total_units}, options.dtype(out_dtype));
  at::Tensor tensor_norms = at::empty({n}, options.dtype(out_dtype));
  at::Tensor total_norm = at::empty({}, options.dtype(out_dtype));
  at::Tensor nonfinite = at::empty({}, options.dtype(at::kFloat));
  int64_t* units_ptr = tensor_units.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "multi_tensor_unit_norm_cuda", [&] {
        if (max_abs) {
          multi_tensor_apply<2>(refs, UnitNormFunctor<scalar_t, true>{unit_sums, units_ptr},
                                kUnitsPerBlock);
        } else {
          multi_tensor_apply<2>(refs, UnitNormFunctor<scalar_t, false>{unit_sums, units_ptr},
                                kUnitsPerBlock);
        }
      });
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "multi_tensor_unit_norm_cuda_out", [&] {
    if (max_abs) {
      launch_norm_stages_2_3<true, scalar_t>(unit_sums, units_ptr, per_tensor, n, tensor_norms,
                                             total_norm, nonfinite);
    } else {
      launch_norm_stages_2_3<false, scalar_t>(unit_sums, units_ptr, per_tensor, n, tensor_norms,
                                              total_norm, nonfinite);
    }
    if (total_units > 0) {
      constexpr int kThreads = 256;
      const int64_t blocks = std::min<int64_t>((total_units + kThreads - 1) / kThreads, 1024);
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      if (max_abs) {
        unit_norm_out_kernel<true, scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0,
                                               stream>>>(unit_sums, total_units,
                                                         unit_norms.data_ptr<scalar_t>());
      } else {
        unit_norm_out_kernel<false, scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0,
                                                stream>>>(unit_sums, total_units,
                                                          unit_norms.data_ptr<scalar_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {unit_norms, tensor_norms, total_norm, nonfinite};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cuda);
  m.impl("multi_tensor_unit_norm", &multi_tensor_unit_norm_cuda);
}

}  // namespace fusedclip::cuda
