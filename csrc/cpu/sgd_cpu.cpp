// CPU kernel of fusedclip::sgd_: one parallel region over chunks of all
// tensors; each chunk loads, calls the shared rule of fusedclip/sgd.h on SIMD
// vectors, and stores. Whether a tensor's momentum buffer takes its first step
// is read from its buffer_steps counter (CPU memory: no sync) once per tensor,
// and picks the variant of the chunk loop; the element loop never branches.
// The gradient goes through the shared GradTransform (grad_transform_cpu.h)
// as it is loaded.
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedclip/grad_transform.h"
#include "fusedclip/sgd.h"
#include "grad_transform_cpu.h"
#include "host_scalars.h"
#include "lanes.h"
#include "multi_tensor.h"
#include "vec_traits.h"

namespace fusedclip::cpu {
namespace {

struct SgdPointers {
  void* param;
  const void* grad;
  void* buf;  // null without momentum
  int64_t numel;
};

// The per-tensor numbers of one tensor: SGD's scalars and the gradient
// transform (grad_transform_cpu.h).
struct TensorScalars {
  SgdScalars<double> sgd;
  TensorTransform transform;
};

template <typename scalar_t, bool WD, Momentum M, bool FIRST, bool CLAMP>
void sgd_run(const SgdPointers& ptrs, int64_t begin, int64_t end,
             const SgdScalars<typename Lanes<scalar_t>::OpVec>& s,
             const GradTransform<typename Lanes<scalar_t>::OpVec>& transform,
             const SgdScalars<typename Lanes<scalar_t>::opmath_t>& tail_s,
             const GradTransform<typename Lanes<scalar_t>::opmath_t>& tail_transform) {
  using L = Lanes<scalar_t>;
  using OpVec = typename L::OpVec;
  using opmath_t = typename L::opmath_t;
  constexpr bool kBuf = M != Momentum::None;
  auto* param = static_cast<scalar_t*>(ptrs.param);
  auto* grad = static_cast<const scalar_t*>(ptrs.grad);
  auto* buf = static_cast<scalar_t*>(ptrs.buf);
  // The elements torch's kernel runs as scalar code round another way (sgd.h).
  const int64_t vec_end = std::min(end, std::max(begin, scalar_tail_begin<scalar_t>(ptrs.numel)));

  OpVec p[L::kParts], g[L::kParts], b[L::kParts];
  const Prefetch prefetch;
  for (int64_t i = begin; i < vec_end; i += L::kWidth) {
    const int64_t count = std::min<int64_t>(L::kWidth, vec_end - i);
    prefetch.to_write(param + i);
    prefetch.to_read(grad + i);
    if constexpr (kBuf) prefetch.to_write(buf + i);
    L::load(param + i, count, p);
    L::load(grad + i, count, g);
    // The first step overwrites the buffer without reading it.
    if constexpr (kBuf && !FIRST) L::load(buf + i, count, b);
    for (int k = 0; k < L::kParts; ++k) {
      sgd_update<WD, M, FIRST>(p[k], transform.template apply<CLAMP>(g[k]), b[k], s);
    }
    L::store(param + i, count, p);
    if constexpr (kBuf) L::store(buf + i, count, b);
  }
  for (int64_t i = vec_end; i < end; ++i) {
    opmath_t p1 = static_cast<opmath_t>(param[i]);
    opmath_t b1 = kBuf && !FIRST ? static_cast<opmath_t>(buf[i]) : opmath_t(0);
    sgd_update<WD, M, FIRST, true>(
        p1, tail_transform.template apply<CLAMP>(static_cast<opmath_t>(grad[i])), b1, tail_s);
    param[i] = static_cast<scalar_t>(p1);
    if constexpr (kBuf) buf[i] = static_cast<scalar_t>(b1);
  }
}

// One chunk, as runs that share one gradient multiplier (the whole chunk
// without unit coefficients).
template <typename scalar_t, bool WD, Momentum M, bool FIRST>
void sgd_chunk(const SgdPointers& ptrs, int64_t begin, int64_t end,
               const TensorScalars& scalars) {
  using L = Lanes<scalar_t>;
  using OpVec = typename L::OpVec;
  using opmath_t = typename L::opmath_t;
  const SgdScalars<opmath_t> tail_s = scalars.sgd.as<opmath_t>();
  const SgdScalars<OpVec> s = tail_s.template as<OpVec>();
  for_each_unit_run(begin, end, scalars.transform,
                    [&](int64_t b, int64_t e, const GradTransform<double>& t, auto clamp) {
                      const GradTransform<opmath_t> tail_t = t.as<opmath_t>();
                      sgd_run<scalar_t, WD, M, FIRST, decltype(clamp)::value>(
                          ptrs, b, e, s, tail_t.template as<OpVec>(), tail_s, tail_t);
                    });
}

using SgdChunkFn = void (*)(const SgdPointers&, int64_t, int64_t, const TensorScalars&);

template <typename scalar_t, bool WD>
SgdChunkFn select_sgd_chunk_wd(Momentum m, bool first) {
  switch (m) {
    case Momentum::None:
      return sgd_chunk<scalar_t, WD, Momentum::None, false>;
    case Momentum::Heavy:
      return first ? sgd_chunk<scalar_t, WD, Momentum::Heavy, true>
                   : sgd_chunk<scalar_t, WD, Momentum::Heavy, false>;
    case Momentum::Nesterov:
      return first ? sgd_chunk<scalar_t, WD, Momentum::Nesterov, true>
                   : sgd_chunk<scalar_t, WD, Momentum::Nesterov, false>;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown momentum mode");
}

// The variant is chosen once per tensor, never inside the element loop.
template <typename scalar_t>
SgdChunkFn select_sgd_chunk(bool weight_decay, Momentum m, bool first) {
  return weight_decay ? select_sgd_chunk_wd<scalar_t, true>(m, first)
                      : select_sgd_chunk_wd<scalar_t, false>(m, first);
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             at::TensorList buffer_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
             double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, const std::optional<at::Tensor>& clip_coef,
             const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, std::optional<double> clip_value,
             std::optional<at::TensorList> unit_coefs) {
  check_sgd_args(params, grads, momentum_buffers, buffer_steps, lr, lr_tensor, momentum,
                 dampening, weight_decay, nesterov, clip_coef, grad_scale, found_inf,
                 clip_value, unit_coefs);
  if (params.empty()) return;
  // A skipped step changes nothing, buffer_steps included: the next step is
  // then a buffer's first step if this one was to be.
  const HostScalars host = HostScalars::read(lr, lr_tensor, clip_coef, grad_scale, found_inf);
  if (host.skip) return;
  const Momentum mode = momentum_mode(momentum, nesterov);
  const bool has_buf = mode != Momentum::None;

  const size_t n = params.size();
  FlatTensors flat_tensors;
  std::vector<SgdPointers> pointers(n);
  std::vector<TensorScalars> scalars(n);
  std::vector<bool> first(n, false);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> group = {params[i], grads[i]};
    std::vector<bool> written = {true, false};
    if (has_buf) {
      group.push_back(momentum_buffers[i]);
      written.push_back(true);
    }
    // Per-unit coefficients need row-major runs.
    std::vector<at::Tensor> flat =
        flat_tensors.take(std::move(group), written, unit_coefs.has_value());
    pointers[i] = {flat[0].data_ptr(), flat[1].const_data_ptr(),
                   has_buf ? flat[2].data_ptr() : nullptr, params[i].numel()};
    if (has_buf) first[i] = increment_step(buffer_steps[i]) == 1.0;
    scalars[i].sgd = sgd_scalars(host.lr, momentum, dampening, weight_decay);
    scalars[i].transform = tensor_transform(host.grad_mult(i, maximize), clip_value,
                                            unit_coefs, i, params[i]);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_cpu", [&] {
    std::vector<SgdChunkFn> chunk_fns(n);
    for (size_t i = 0; i < n; ++i) {
      chunk_fns[i] = select_sgd_chunk<scalar_t>(weight_decay != 0.0, mode, first[i]);
    }
    for_each_tensor_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
      chunk_fns[t](pointers[t], begin, end, scalars[t]);
    });
  });
  flat_tensors.copy_home();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("sgd_", &sgd_cpu);
}

}  // namespace fusedclip::cpu
