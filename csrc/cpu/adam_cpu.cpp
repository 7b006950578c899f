// CPU kernel of fusedclip::adam_: one parallel region over chunks of all
// tensors; each chunk loads, calls the shared rule of fusedclip/adam.h on SIMD
// vectors, and stores. Per-tensor scalars (clip coefficient, bias corrections)
// are folded once per tensor before the element loop.
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedclip/adam.h"
#include "fusedclip/grad_transform.h"
#include "grad_transform_cpu.h"
#include "host_scalars.h"
#include "lanes.h"
#include "multi_tensor.h"
#include "vec_traits.h"

namespace fusedclip::cpu {
namespace {

struct AdamPointers {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // null without amsgrad
  int64_t numel;
};

// The per-tensor numbers of one tensor: Adam's scalars and the gradient
// transform (grad_transform_cpu.h).
struct TensorScalars {
  AdamScalars<double> adam;
  TensorTransform transform;
};

template <typename scalar_t, WeightDecay WD, bool AMSGRAD, bool CLAMP>
void adam_run(const AdamPointers& ptrs, int64_t begin, int64_t end,
              const AdamScalars<typename Lanes<scalar_t>::OpVec>& s,
              const GradTransform<typename Lanes<scalar_t>::OpVec>& transform,
              const AdamScalars<typename Lanes<scalar_t>::opmath_t>& tail_s,
              const GradTransform<typename Lanes<scalar_t>::opmath_t>& tail_transform) {
  using L = Lanes<scalar_t>;
  using OpVec = typename L::OpVec;
  using opmath_t = typename L::opmath_t;
  auto* param = static_cast<scalar_t*>(ptrs.param);
  auto* grad = static_cast<const scalar_t*>(ptrs.grad);
  auto* exp_avg = static_cast<scalar_t*>(ptrs.exp_avg);
  auto* exp_avg_sq = static_cast<scalar_t*>(ptrs.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<scalar_t*>(ptrs.max_exp_avg_sq);
  // The elements torch's kernel runs as scalar code round another way (adam.h).
  const int64_t vec_end = std::min(end, std::max(begin, scalar_tail_begin<scalar_t>(ptrs.numel)));

  OpVec p[L::kParts], g[L::kParts], m[L::kParts], v[L::kParts], vmax[L::kParts];
  const Prefetch prefetch;
  for (int64_t i = begin; i < vec_end; i += L::kWidth) {
    const int64_t count = std::min<int64_t>(L::kWidth, vec_end - i);
    prefetch.to_write(param + i);
    prefetch.to_read(grad + i);
    prefetch.to_write(exp_avg + i);
    prefetch.to_write(exp_avg_sq + i);
    if constexpr (AMSGRAD) prefetch.to_write(max_exp_avg_sq + i);
    L::load(param + i, count, p);
    L::load(grad + i, count, g);
    L::load(exp_avg + i, count, m);
    L::load(exp_avg_sq + i, count, v);
    if constexpr (AMSGRAD) L::load(max_exp_avg_sq + i, count, vmax);
    for (int k = 0; k < L::kParts; ++k) {
      adam_update<WD, AMSGRAD>(p[k], transform.template apply<CLAMP>(g[k]), m[k], v[k], vmax[k], s);
    }
    L::store(param + i, count, p);
    L::store(exp_avg + i, count, m);
    L::store(exp_avg_sq + i, count, v);
    if constexpr (AMSGRAD) L::store(max_exp_avg_sq + i, count, vmax);
  }
  for (int64_t i = vec_end; i < end; ++i) {
    opmath_t p1 = static_cast<opmath_t>(param[i]);
    opmath_t m1 = static_cast<opmath_t>(exp_avg[i]);
    opmath_t v1 = static_cast<opmath_t>(exp_avg_sq[i]);
    opmath_t vmax1 = AMSGRAD ? static_cast<opmath_t>(max_exp_avg_sq[i]) : opmath_t(0);
    adam_update<WD, AMSGRAD, true>(
        p1, tail_transform.template apply<CLAMP>(static_cast<opmath_t>(grad[i])), m1, v1, vmax1,
        tail_s);
    param[i] = static_cast<scalar_t>(p1);
    exp_avg[i] = static_cast<scalar_t>(m1);
    exp_avg_sq[i] = static_cast<scalar_t>(v1);
    if constexpr (AMSGRAD) max_exp_avg_sq[i] = static_cast<scalar_t>(vmax1);
  }
}

// One chunk, as runs that share one gradient multiplier (the whole chunk
// without unit coefficients).
template <typename scalar_t, WeightDecay WD, bool AMSGRAD>
void adam_chunk(const AdamPointers& ptrs, int64_t begin, int64_t end,
                const TensorScalars& scalars) {
  using L = Lanes<scalar_t>;
  using OpVec = typename L::OpVec;
  using opmath_t = typename L::opmath_t;
  const AdamScalars<opmath_t> tail_s = scalars.adam.as<opmath_t>();
  const AdamScalars<OpVec> s = tail_s.template as<OpVec>();
  for_each_unit_run(begin, end, scalars.transform,
                    [&](int64_t b, int64_t e, const GradTransform<double>& t, auto clamp) {
                      const GradTransform<opmath_t> tail_t = t.as<opmath_t>();
                      adam_run<scalar_t, WD, AMSGRAD, decltype(clamp)::value>(
                          ptrs, b, e, s, tail_t.template as<OpVec>(), tail_s, tail_t);
                    });
}

using AdamChunkFn = void (*)(const AdamPointers&, int64_t, int64_t,
                             const TensorScalars&);

// The variant is chosen once per call, never inside the element loop.
template <typename scalar_t>
AdamChunkFn select_adam_chunk(WeightDecay wd, bool amsgrad) {
  switch (wd) {
    case WeightDecay::None:
      return amsgrad ? adam_chunk<scalar_t, WeightDecay::None, true>
                     : adam_chunk<scalar_t, WeightDecay::None, false>;
    case WeightDecay::L2:
      return amsgrad ? adam_chunk<scalar_t, WeightDecay::L2, true>
                     : adam_chunk<scalar_t, WeightDecay::L2, false>;
    case WeightDecay::Decoupled:
      return amsgrad ? adam_chunk<scalar_t, WeightDecay::Decoupled, true>
                     : adam_chunk<scalar_t, WeightDecay::Decoupled, false>;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown weight decay mode");
}

void adam_cpu(at::TensorList params, at::TensorList grads,
              at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
              at::TensorList max_exp_avg_sqs, at::TensorList steps, double lr,
              const std::optional<at::Tensor>& lr_tensor, double beta1,
              double beta2, double eps, double weight_decay, bool amsgrad,
              bool maximize, bool decoupled_weight_decay,
              const std::optional<at::Tensor>& clip_coef,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf,
              std::optional<double> clip_value,
              std::optional<at::TensorList> unit_coefs) {
  check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                  lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad,
                  clip_coef, grad_scale, found_inf, clip_value, unit_coefs);
  if (params.empty()) return;
  // A skipped step changes nothing, not even the step counters.
  const HostScalars host = HostScalars::read(lr, lr_tensor, clip_coef, grad_scale, found_inf);
  if (host.skip) return;
  const WeightDecay wd = weight_decay_mode(weight_decay, decoupled_weight_decay);

  const size_t n = params.size();
  FlatTensors flat_tensors;
  std::vector<AdamPointers> pointers(n);
  std::vector<TensorScalars> scalars(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> group = {params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]};
    std::vector<bool> written = {true, false, true, true};
    if (amsgrad) {
      group.push_back(max_exp_avg_sqs[i]);
      written.push_back(true);
    }
    // Per-unit coefficients need row-major runs.
    std::vector<at::Tensor> flat =
        flat_tensors.take(std::move(group), written, unit_coefs.has_value());
    pointers[i] = {flat[0].data_ptr(), flat[1].const_data_ptr(), flat[2].data_ptr(),
                   flat[3].data_ptr(), amsgrad ? flat[4].data_ptr() : nullptr,
                   params[i].numel()};

    const double grad_mult = host.grad_mult(i, maximize);
    scalars[i].adam = adam_scalars(host.lr, beta1, beta2, eps, weight_decay,
                                   increment_step(steps[i]));
    scalars[i].transform = tensor_transform(grad_mult, clip_value, unit_coefs, i, params[i]);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_cpu", [&] {
    const AdamChunkFn chunk_fn = select_adam_chunk<scalar_t>(wd, amsgrad);
    for_each_tensor_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
      chunk_fn(pointers[t], begin, end, scalars[t]);
    });
  });
  flat_tensors.copy_home();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("adam_", &adam_cpu);
}

}  // namespace fusedclip::cpu
