// CUDA kernel of fusedclip::adam_, with the CPU kernel's semantics
// (cpu/adam_cpu.cpp) and no host sync: every value the CPU kernel reads on the
// host (found_inf, lr_tensor, grad_scale, clip_coef, the step counters) is read
// here by the kernel itself, from device memory.
//
// Two kinds of launch, in this order on the current stream:
//   1. the update: one block per chunk; the block folds its tensor's scalars
//      with adam_scalars() and applies adam_update() (include/fusedclip/adam.h,
//      the functions the CPU kernel calls) to every element;
//   2. the step increment: one block per step counter adds 1.
// The update reads each counter and uses its value + 1; the counters are only
// written by the second launch, which starts after every block of the first
// has finished, so no block can see a counter already incremented. Where
// found_inf is non-zero both launches leave everything as it was.
#include <array>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../cpu/multi_tensor.h"  // FlatTensors: the layout handling of the CPU kernel
#include "fusedclip/adam.h"
#include "fusedclip/grad_transform.h"
#include "grad_transform.cuh"
#include "multi_tensor_apply.cuh"

namespace fusedclip::cuda {
namespace {

// A float32 or float64 tensor of one value, or of one value per tensor, that
// the kernel reads from device memory. Absent (null) reads as a default.
struct DeviceScalar {
  const void* ptr = nullptr;
  int64_t stride = 0;  // elements between consecutive values; 0 for one value
  bool is_double = false;

  static DeviceScalar of(const std::optional<at::Tensor>& t) {
    DeviceScalar s;
    if (!t.has_value()) return s;
    s.ptr = t->const_data_ptr();
    s.stride = (t->dim() == 0 || t->numel() == 1) ? 0 : t->stride(0);
    s.is_double = t->scalar_type() == at::kDouble;
    return s;
  }

  __device__ __forceinline__ double load(int64_t index, double absent) const {
    if (ptr == nullptr) return absent;
    const int64_t offset = index * stride;
    return is_double ? static_cast<const double*>(ptr)[offset]
                     : static_cast<double>(static_cast<const float*>(ptr)[offset]);
  }
};

// The arguments of one call, as the kernels need them.
struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
  bool step_is_double;  // all counters of the call have one dtype (see adam_cuda)
  DeviceScalar lr_tensor, clip_coef, grad_scale, found_inf;
  TransformArgs transform;  // clip_value, unit_coefs (kUnitCoef, kUnitLen lists)
};

// Lists of the update launch, in metadata order. The step counter is a list
// of its own whose pointer is read at element 0; kUnitCoef points at the
// tensor's per-unit coefficients (contiguous; null without unit_coefs) and
// kUnitLen is not a pointer but the tensor's unit length (elements per index
// of dim 0) stored in the pointer's bits; max_exp_avg_sq comes last so that it
// is simply absent without amsgrad.
enum AdamList { kParam, kGrad, kExpAvg, kExpAvgSq, kStep, kUnitCoef, kUnitLen, kMaxExpAvgSq };

template <typename scalar_t, WeightDecay WD, bool AMSGRAD>
struct AdamFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = AMSGRAD ? 8 : 7;
  // Element arrays handed to the rule: param, grad, exp_avg, exp_avg_sq and,
  // with amsgrad, max_exp_avg_sq. All but the gradient are written.
  static constexpr int kArrays = AMSGRAD ? 5 : 4;
  static constexpr unsigned kWriteMask = ((1u << kArrays) - 1u) & ~(1u << 1);

  AdamArgs args;

  __device__ __forceinline__ void operator()(const TensorListMetadata<kDepth>& meta,
                                             const ChunkRef& c) const {
    // A skipped step writes nothing. All threads read the same flag, so the
    // whole block leaves together, before the barrier below.
    if (args.found_inf.load(0, 0.0) != 0.0) return;

    // The per-tensor scalars, folded once per block by one thread, exactly
    // as the CPU kernel folds them (in double, then rounded to the math type).
    __shared__ AdamScalars<opmath_t> shared_scalars;
    __shared__ GradTransform<double> shared_transform;
    if (threadIdx.x == 0) {
      const void* step_ptr = meta.addresses[kStep][c.slot];
      // The count after this step's increment, computed in the counter's own
      // dtype as the CPU kernel's ++ does; the counter itself is written by
      // the increment launch that follows.
      const double step =
          args.step_is_double
              ? *static_cast<const double*>(step_ptr) + 1.0
              : static_cast<double>(*static_cast<const float*>(step_ptr) + 1.0f);
      const double inv_scale = 1.0 / args.grad_scale.load(0, 1.0);
      const double grad_mult =
          args.clip_coef.load(c.tensor, 1.0) * inv_scale * (args.maximize ? -1.0 : 1.0);
      shared_scalars = adam_scalars(args.lr_tensor.load(0, args.lr), args.beta1, args.beta2,
                                    args.eps, args.weight_decay, step, grad_mult)
                           .template as<opmath_t>();
      shared_transform = grad_transform(grad_mult, args.transform.clip_value);
    }
    __syncthreads();
    const AdamScalars<opmath_t> s = shared_scalars;
    const ChunkTransform<opmath_t> transform(args.transform, shared_transform,
                                             meta.addresses[kUnitCoef][c.slot],
                                             meta.addresses[kUnitLen][c.slot], c.begin);

    scalar_t* ptrs[kArrays];
    ptrs[0] = static_cast<scalar_t*>(meta.addresses[kParam][c.slot]) + c.begin;
    ptrs[1] = static_cast<scalar_t*>(meta.addresses[kGrad][c.slot]) + c.begin;
    ptrs[2] = static_cast<scalar_t*>(meta.addresses[kExpAvg][c.slot]) + c.begin;
    ptrs[3] = static_cast<scalar_t*>(meta.addresses[kExpAvgSq][c.slot]) + c.begin;
    if constexpr (AMSGRAD) {
      ptrs[4] = static_cast<scalar_t*>(meta.addresses[kMaxExpAvgSq][c.slot]) + c.begin;
    }
    chunk_foreach<scalar_t, kArrays, kWriteMask>(ptrs, c.size, [&](opmath_t(&x)[kArrays], int i) {
      const opmath_t grad = transform(x[1], i);
      if constexpr (AMSGRAD) {
        adam_update<WD, true>(x[0], grad, x[2], x[3], x[4], s);
      } else {
        opmath_t unused = 0;
        adam_update<WD, false>(x[0], grad, x[2], x[3], unused, s);
      }
    });
  }
};

// Adds 1 to each step counter (a one-element list per tensor), unless the step
// is skipped. One thread per counter does it.
template <typename step_t>
struct StepIncrementFunctor {
  DeviceScalar found_inf;

  __device__ __forceinline__ void operator()(const TensorListMetadata<1>& meta,
                                             const ChunkRef& c) const {
    if (threadIdx.x != 0 || found_inf.load(0, 0.0) != 0.0) return;
    step_t* step = static_cast<step_t*>(meta.addresses[0][c.slot]);
    *step = *step + step_t(1);
  }
};

// The pointers of one parameter, in AdamList order (kMaxExpAvgSq null without
// amsgrad).
using AdamPointers = std::array<void*, 8>;

template <typename scalar_t, WeightDecay WD, bool AMSGRAD>
void launch_adam(const std::vector<AdamPointers>& pointers,
                 const std::vector<int64_t>& numels, const AdamArgs& args) {
  using Functor = AdamFunctor<scalar_t, WD, AMSGRAD>;
  constexpr int kDepth = Functor::kDepth;
  std::vector<TensorRef<kDepth>> refs(pointers.size());
  for (size_t i = 0; i < pointers.size(); ++i) {
    for (int d = 0; d < kDepth; ++d) refs[i].ptrs[d] = pointers[i][d];
    refs[i].numel = numels[i];
  }
  multi_tensor_apply<kDepth>(refs, Functor{args});
}

// The variant is chosen once per call, on the host: weight decay mode and
// amsgrad are template parameters of the kernel, never a branch per element.
template <typename scalar_t>
void launch_adam_variant(WeightDecay wd, bool amsgrad, const std::vector<AdamPointers>& pointers,
                         const std::vector<int64_t>& numels, const AdamArgs& args) {
  switch (wd) {
    case WeightDecay::None:
      return amsgrad ? launch_adam<scalar_t, WeightDecay::None, true>(pointers, numels, args)
                     : launch_adam<scalar_t, WeightDecay::None, false>(pointers, numels, args);
    case WeightDecay::L2:
      return amsgrad ? launch_adam<scalar_t, WeightDecay::L2, true>(pointers, numels, args)
                     : launch_adam<scalar_t, WeightDecay::L2, false>(pointers, numels, args);
    case WeightDecay::Decoupled:
      return amsgrad ? launch_adam<scalar_t, WeightDecay::Decoupled, true>(pointers, numels, args)
                     : launch_adam<scalar_t, WeightDecay::Decoupled, false>(pointers, numels, args);
  }
  TORCH_INTERNAL_ASSERT(false, "unknown weight decay mode");
}

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
               double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
               bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& clip_coef,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf,
               std::optional<double> clip_value,
               std::optional<at::TensorList> unit_coefs) {
  check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor,
                  beta1, beta2, eps, weight_decay, amsgrad, clip_coef, grad_scale, found_inf,
                  clip_value, unit_coefs);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const WeightDecay wd = weight_decay == 0.0 ? WeightDecay::None
                         : decoupled_weight_decay ? WeightDecay::Decoupled
                                                  : WeightDecay::L2;
  const size_t n = params.size();

  // The kernels read and write all counters of a call as one dtype. Where a
  // call mixes float32 and float64 counters, float64 copies stand in and are
  // copied home after the increment (float32 counts convert exactly).
  bool steps_mixed = false;
  for (const at::Tensor& s : steps) {
    steps_mixed = steps_mixed || s.scalar_type() != steps[0].scalar_type();
  }
  std::vector<at::Tensor> step_work(steps.begin(), steps.end());
  if (steps_mixed) {
    for (at::Tensor& s : step_work) s = s.to(at::kDouble);
  }

  AdamArgs args;
  args.lr = lr;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.maximize = maximize;
  args.step_is_double = step_work[0].scalar_type() == at::kDouble;
  args.lr_tensor = DeviceScalar::of(lr_tensor);
  args.clip_coef = DeviceScalar::of(clip_coef);
  args.grad_scale = DeviceScalar::of(grad_scale);
  args.found_inf = DeviceScalar::of(found_inf);
  const UnitCoefLists unit_lists(clip_value, unit_coefs);
  args.transform = unit_lists.args();

  // Parameters whose param, grad and states do not share one dense layout are
  // updated through contiguous copies, copied home after the kernel, as on CPU.
  cpu::FlatTensors flat_tensors;
  std::vector<at::Tensor> keep_alive;  // stand-ins live until copied home
  std::vector<AdamPointers> pointers(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> group = {params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]};
    std::vector<bool> written = {true, false, true, true};
    if (amsgrad) {
      group.push_back(max_exp_avg_sqs[i]);
      written.push_back(true);
    }
    // Per-unit coefficients need row-major runs.
    std::vector<at::Tensor> flat =
        flat_tensors.take(std::move(group), written, args.transform.unit_coefs);
    pointers[i] = {flat[0].data_ptr(), const_cast<void*>(flat[1].const_data_ptr()),
                   flat[2].data_ptr(), flat[3].data_ptr(),
                   // Read only by the update launch; written by the increment.
                   const_cast<void*>(step_work[i].const_data_ptr()),
                   unit_lists.coef_ptr(i), UnitCoefLists::len_bits(params[i]),
                   amsgrad ? flat[4].data_ptr() : nullptr};
    numels[i] = params[i].numel();
    keep_alive.insert(keep_alive.end(), flat.begin(), flat.end());
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_cuda",
                                  [&] { launch_adam_variant<scalar_t>(wd, amsgrad, pointers, numels, args); });

  // After the update, never during it: see the top of this file.
  std::vector<TensorRef<1>> step_refs(n);
  for (size_t i = 0; i < n; ++i) step_refs[i] = {{step_work[i].data_ptr()}, 1};
  // One warp per counter is plenty: a single thread does the work.
  constexpr int kStepThreads = 32;
  if (args.step_is_double) {
    multi_tensor_apply<1>(step_refs, StepIncrementFunctor<double>{args.found_inf}, kChunkSize,
                          kStepThreads);
  } else {
    multi_tensor_apply<1>(step_refs, StepIncrementFunctor<float>{args.found_inf}, kChunkSize,
                          kStepThreads);
  }

  flat_tensors.copy_home();
  if (steps_mixed) {
    for (size_t i = 0; i < n; ++i) {
      if (!step_work[i].is_same(steps[i])) steps[i].copy_(step_work[i]);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("adam_", &adam_cuda);
}

}  // namespace fusedclip::cuda
