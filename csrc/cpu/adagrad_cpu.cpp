// CPU kernel of fusedclip::adagrad_: one parallel region over chunks of all
// tensors; each chunk loads, calls the shared rule of fusedclip/adagrad.h on
// SIMD vectors, and stores. Per-tensor scalars (the decayed learning rate, the
// gradient transform of grad_transform_cpu.h) are folded once per tensor
// before the element loop.
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedclip/adagrad.h"
#include "fusedclip/grad_transform.h"
#include "grad_transform_cpu.h"
#include "host_scalars.h"
#include "lanes.h"
#include "multi_tensor.h"
#include "vec_traits.h"

namespace fusedclip::cpu {
namespace {

struct AdagradPointers {
  void* param;
  const void* grad;
  void* sum;
};

// The per-tensor numbers of one tensor: Adagrad's scalars and the gradient
// transform (grad_transform_cpu.h).
struct TensorScalars {
  AdagradScalars<double> adagrad;
  TensorTransform transform;
};

template <typename scalar_t, bool WD, bool CLAMP>
void adagrad_run(const AdagradPointers& ptrs, int64_t begin, int64_t end,
                 const AdagradScalars<typename Lanes<scalar_t>::OpVec>& s,
                 const GradTransform<typename Lanes<scalar_t>::OpVec>& transform) {
  using L = Lanes<scalar_t>;
  using OpVec = typename L::OpVec;
  auto* param = static_cast<scalar_t*>(ptrs.param) + begin;
  auto* grad = static_cast<const scalar_t*>(ptrs.grad) + begin;
  auto* sum = static_cast<scalar_t*>(ptrs.sum) + begin;

  const int64_t n = end - begin;
  OpVec p[L::kParts], g[L::kParts], v[L::kParts];
  const Prefetch prefetch;
  for (int64_t i = 0; i < n; i += L::kWidth) {
    const int64_t count = std::min<int64_t>(L::kWidth, n - i);
    prefetch.to_write(param + i);
    prefetch.to_read(grad + i);
    prefetch.to_write(sum + i);
    L::load(param + i, count, p);
    L::load(grad + i, count, g);
    L::load(sum + i, count, v);
    for (int k = 0; k < L::kParts; ++k) {
      adagrad_update<WD>(p[k], transform.template apply<CLAMP>(g[k]), v[k], s);
    }
    L::store(param + i, count, p);
    L::store(sum + i, count, v);
  }
}

// One chunk, as runs that share one gradient multiplier (the whole chunk
// without unit coefficients).
template <typename scalar_t, bool WD>
void adagrad_chunk(const AdagradPointers& ptrs, int64_t begin, int64_t end,
                   const TensorScalars& scalars) {
  using L = Lanes<scalar_t>;
  using OpVec = typename L::OpVec;
  using opmath_t = typename L::opmath_t;
  const AdagradScalars<OpVec> s = scalars.adagrad.as<opmath_t>().template as<OpVec>();
  for_each_unit_run(begin, end, scalars.transform,
                    [&](int64_t b, int64_t e, const GradTransform<double>& t, auto clamp) {
                      adagrad_run<scalar_t, WD, decltype(clamp)::value>(
                          ptrs, b, e, s, t.as<opmath_t>().template as<OpVec>());
                    });
}

void adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                 at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                 double lr_decay, double weight_decay, double eps, bool maximize,
                 const std::optional<at::Tensor>& clip_coef,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf,
                 std::optional<double> clip_value,
                 std::optional<at::TensorList> unit_coefs) {
  check_adagrad_args(params, grads, state_sums, steps, lr, lr_tensor, lr_decay, weight_decay,
                     eps, clip_coef, grad_scale, found_inf, clip_value, unit_coefs);
  if (params.empty()) return;
  // A skipped step changes nothing, not even the step counters.
  const HostScalars host = HostScalars::read(lr, lr_tensor, clip_coef, grad_scale, found_inf);
  if (host.skip) return;

  const size_t n = params.size();
  FlatTensors flat_tensors;
  std::vector<AdagradPointers> pointers(n);
  std::vector<TensorScalars> scalars(n);
  for (size_t i = 0; i < n; ++i) {
    // Per-unit coefficients need row-major runs.
    std::vector<at::Tensor> flat = flat_tensors.take({params[i], grads[i], state_sums[i]},
                                                     {true, false, true}, unit_coefs.has_value());
    pointers[i] = {flat[0].data_ptr(), flat[1].const_data_ptr(), flat[2].data_ptr()};
    scalars[i].adagrad = adagrad_scalars(host.lr, lr_decay, weight_decay, eps,
                                         increment_step(steps[i]));
    scalars[i].transform = tensor_transform(host.grad_mult(i, maximize), clip_value,
                                            unit_coefs, i, params[i]);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adagrad_cpu", [&] {
    const auto chunk_fn = weight_decay != 0.0 ? adagrad_chunk<scalar_t, true>
                                              : adagrad_chunk<scalar_t, false>;
    for_each_tensor_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
      chunk_fn(pointers[t], begin, end, scalars[t]);
    });
  });
  flat_tensors.copy_home();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("adagrad_", &adagrad_cpu);
}

}  // namespace fusedclip::cpu
