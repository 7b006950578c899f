// The CPU driver of every update rule (include/fusedclip/rule.h), registered
// once per rule of rules.h: one parallel region over chunks of all tensors
// (multi_tensor.h); each chunk loads param, grad and the rule's states as SIMD
// vectors of the math type (lanes.h), multiplies the gradient by its tensor's
// (or unit's) multiplier, passes it through the call's element-wise
// transforms (grad_transform.h), calls the rule, and stores. Per-tensor
// numbers (the rule's scalars, the gradient multiplier) are folded once per
// tensor before the element loop; the rule's variant and the set of active
// transforms are template parameters, chosen once per call.
#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/FunctionRef.h>
#include <torch/library.h>

#include "capability.h"
#include "../update_op.h"
#include "fusedclip/grad_transform.h"
#include "fusedclip/rules.h"
#include "grad_transform_cpu.h"
#include "host_scalars.h"
#include "kernels.h"
#include "lanes.h"
#include "mixed_precision.h"
#include "multi_tensor.h"
#include "vec_traits.h"

namespace fusedclip::cpu {
inline namespace CPU_CAPABILITY {  // capability.h
namespace {

// The arrays of one tensor: param, grad, then the rule's states (at most
// kMaxStates, rules.h: every variant is checked against it below). Element
// j of each array is element offset + j of the tensor (offset 0: the
// tensor's own memory; a mixed call's float32 scratch block: its start).
struct TensorArrays {
  void* param;
  const void* grad;
  std::array<void*, kMaxStates> states;
  int64_t numel;  // the tensor's
  int64_t offset = 0;
};

// What one tensor's element loop needs besides its arrays.
template <class Rule>
struct TensorWork {
  typename Rule::template Scalars<double> scalars;
  TensorMult mult;  // the gradient's multiplier and unit coefficients
};

// One run of elements [begin, end) of the arrays (elements offset + begin ..
// of the tensor) that shares one gradient multiplier. Active: the call's element-wise transforms
// (ActiveTransforms<double, ...>). The elements torch's kernels run as scalar
// code (lanes.h, scalar_tail_begin) go through the rule's SCALAR_TAIL
// rounding, one by one.
template <typename scalar_t, class Rule, class V, class Active>
void run(const TensorArrays& a, int64_t begin, int64_t end,
         const typename Rule::template Scalars<typename Lanes<scalar_t>::OpVec>& s,
         typename Lanes<scalar_t>::OpVec mult,
         typename Active::template As<typename Lanes<scalar_t>::OpVec> transforms,
         const typename Rule::template Scalars<typename Lanes<scalar_t>::opmath_t>& tail_s,
         typename Lanes<scalar_t>::opmath_t tail_mult,
         typename Active::template As<typename Lanes<scalar_t>::opmath_t> tail_transforms) {
  using L = Lanes<scalar_t>;
  using OpVec = typename L::OpVec;
  using opmath_t = typename L::opmath_t;
  constexpr int K = V::kStates;
  constexpr int KA = K > 0 ? K : 1;  // no zero-length arrays
  auto* param = static_cast<scalar_t*>(a.param);
  auto* grad = static_cast<const scalar_t*>(a.grad);
  scalar_t* states[KA];
  for (int k = 0; k < KA; ++k) states[k] = static_cast<scalar_t*>(a.states[k]);
  const int64_t vec_end =
      std::min(end, std::max(begin, scalar_tail_begin<scalar_t>(a.numel) - a.offset));

  const Prefetch prefetch;
  for_each_step<L::kWidth>(begin, vec_end, [&](int64_t i, auto count) {
    OpVec p[L::kParts], g[L::kParts], st[KA][L::kParts];
    prefetch.to_write(param + i);
    prefetch.to_read(grad + i);
    for (int k = 0; k < K; ++k) prefetch.to_write(states[k] + i);
    L::load(param + i, count, p);
    L::load(grad + i, count, g);
    for (int k = 0; k < K; ++k) L::load(states[k] + i, count, st[k]);
    for (int part = 0; part < L::kParts; ++part) {
      OpVec x[KA];
      for (int k = 0; k < K; ++k) x[k] = st[k][part];
      const OpVec gx = transforms.template apply<Rule>(g[part] * mult, x);
      V::template update<false>(p[part], gx, x, s);
      for (int k = 0; k < K; ++k) st[k][part] = x[k];
    }
    L::store(param + i, count, p);
    for (int k = 0; k < K; ++k) L::store(states[k] + i, count, st[k]);
  });
  for (int64_t i = vec_end; i < end; ++i) {
    opmath_t p1 = static_cast<opmath_t>(param[i]);
    opmath_t x[KA];
    for (int k = 0; k < K; ++k) x[k] = static_cast<opmath_t>(states[k][i]);
    const opmath_t gx =
        tail_transforms.template apply<Rule>(static_cast<opmath_t>(grad[i]) * tail_mult, x);
    V::template update<true>(p1, gx, x, tail_s);
    param[i] = static_cast<scalar_t>(p1);
    for (int k = 0; k < K; ++k) states[k][i] = static_cast<scalar_t>(x[k]);
  }
}

// Elements [begin, begin + n) of every array of a mixed tensor, asked for
// ahead (prefetch_array); nothing where n <= 0.
void prefetch_mixed_block(const MixedTensor& m, int64_t begin, int64_t n) {
  if (n <= 0) return;
  const int64_t param_bytes = storage_bytes(m.param_dtype);
  prefetch_array(m.param, param_bytes, begin, n);
  prefetch_array(m.grad, param_bytes, begin, n);
  for (int k = 0; k < m.num_states; ++k) {
    prefetch_array(m.states[k], storage_bytes(m.state_dtypes[k]), begin, n);
  }
  if (m.master_kind != MasterKind::None) {
    prefetch_array(m.master, master_bytes(m.master_kind), begin, n);
  }
}

// The kernel of a mixed call's block: the float32 element loop over the
// tensor's elements [begin, end), whose arrays `a` hold (a.offset: begin).
using BlockKernel = c10::function_ref<void(const TensorArrays& a, int64_t begin, int64_t end)>;

// Elements [begin, end) of a tensor of a mixed call, block by block: every
// array not float32 widened into float32 scratch (a full fp32 master, or one
// rebuilt from its remainder, standing in for the parameter), the float32
// kernel, and the scratch stored back (precision.h); a parameter of a master
// is written from it, rounded to nearest.
void run_mixed_chunk(const MixedTensor& m, int64_t numel, int64_t begin, int64_t end,
                     BlockKernel kernel) {
  alignas(64) float scratch[2 + kMaxStates][kMixedBlock];
  alignas(64) uint32_t sr_first[kSrHalf];
  static_assert(kChunkSize % kMixedBlock == 0, "blocks start at multiples of kMixedBlock");
  for (int64_t b0 = begin; b0 < end; b0 += kMixedBlock) {
    const int64_t n = std::min(kMixedBlock, end - b0);
    const int64_t ahead = b0 + 2 * kMixedBlock;  // prefetch_array
    prefetch_mixed_block(m, ahead, std::min(kMixedBlock, end - ahead));
    TensorArrays a;
    a.numel = numel;
    a.offset = b0;
    float* param = scratch[0];
    if (m.master_kind == MasterKind::Full) {
      param = static_cast<float*>(m.master) + b0;
    } else if (m.master_kind == MasterKind::Remainder) {
      rebuild_masters(static_cast<const at::BFloat16*>(m.param) + b0,
                      static_cast<const int16_t*>(m.master) + b0, param, n);
    } else if (m.param_dtype == Storage::F32) {
      param = static_cast<float*>(m.param) + b0;
    } else {
      widen_any(m.param, m.param_dtype, b0, param, n);
    }
    a.param = param;
    if (m.param_dtype == Storage::F32) {
      a.grad = static_cast<const float*>(m.grad) + b0;
    } else {
      widen_any(m.grad, m.param_dtype, b0, scratch[1], n);
      a.grad = scratch[1];
    }
    for (int k = 0; k < m.num_states; ++k) {
      if (m.state_dtypes[k] == Storage::F32) {
        a.states[k] = static_cast<float*>(m.states[k]) + b0;
      } else {
        widen_any(m.states[k], m.state_dtypes[k], b0, scratch[2 + k], n);
        a.states[k] = scratch[2 + k];
      }
    }
    kernel(a, b0, b0 + n);
    // Stochastic rounding: the first hash round of the block, shared by its
    // arrays (precision.h: sr_key), where any is rounded.
    const uint32_t* first = nullptr;
    if (m.sr_first) {
      sr_block_first(m.keys[0].k0, b0, sr_first, n);
      first = sr_first;
    }
    for (int k = 0; k < m.num_states; ++k) {
      if (m.state_dtypes[k] == Storage::F32) continue;
      narrow_any(scratch[2 + k], m.states[k], m.state_dtypes[k], first, m.keys[1 + k], b0, n);
    }
    if (m.master_kind == MasterKind::Remainder) {
      split_masters(param, static_cast<at::BFloat16*>(m.param) + b0,
                    static_cast<int16_t*>(m.master) + b0, n);
    } else if (m.master_kind == MasterKind::Full && m.param_dtype == Storage::BF16) {
      split_masters(param, static_cast<at::BFloat16*>(m.param) + b0, nullptr, n);
    } else if (m.master_kind == MasterKind::Full) {
      narrow(param, static_cast<at::Half*>(m.param) + b0, n);
    } else if (m.param_dtype != Storage::F32) {
      narrow_any(param, m.param, m.param_dtype, first, m.keys[0], b0, n);
    }
  }
}

// The arrays of tensor i of a mixed call, flat (FlatTensors: stand-ins where
// they do not share a dense layout), its dtypes and its stochastic-rounding
// keys (from the counter before this call's increment).
MixedTensor mixed_tensor(FlatTensors& flat_tensors, const UpdateCall& call, size_t i) {
  const std::vector<at::Tensor> flat = flat_update_arrays(flat_tensors, call, i);
  MixedTensor m{};
  m.param = flat[0].data_ptr();
  m.grad = flat[1].const_data_ptr();
  m.param_dtype = storage_of(flat[0].scalar_type());
  m.num_states = static_cast<int>(call.states.size());
  for (int k = 0; k < m.num_states; ++k) {
    m.states[k] = flat[2 + k].data_ptr();
    m.state_dtypes[k] = storage_of(flat[2 + k].scalar_type());
  }
  m.master_kind = MasterKind::None;
  if (call.masters.has_value()) {
    const at::Tensor& master = flat[2 + m.num_states];
    m.master = master.data_ptr();
    m.master_kind = master.scalar_type() == at::kFloat ? MasterKind::Full : MasterKind::Remainder;
  }
  m.sr = call.sr_generators.has_value();
  if (m.sr) {
    const int64_t* gen = (*call.sr_generators)[i].const_data_ptr<int64_t>();
    for (int slot = 0; slot <= m.num_states; ++slot) {
      m.keys[slot] = precision::sr_key(gen[0], gen[1], slot);
    }
    // Arrays rounded stochastically: the param without master, states not float32.
    m.sr_first = m.master_kind == MasterKind::None && m.param_dtype != Storage::F32;
    for (int k = 0; k < m.num_states; ++k) m.sr_first |= m.state_dtypes[k] != Storage::F32;
  }
  return m;
}

// The arrays of tensor i of a call that is not mixed: the tensors themselves
// where they can be walked flat as they are (no copies of them, no
// allocation: the common case), else FlatTensors' stand-ins.
TensorArrays tensor_arrays(FlatTensors& flat_tensors, const UpdateCall& call, size_t i) {
  TensorArrays a;
  a.numel = call.params[i].numel();
  const size_t k = call.states.size();
  if (update_arrays_flat(call, i)) {
    a.param = call.params[i].data_ptr();
    a.grad = call.grads[i].const_data_ptr();
    for (size_t s = 0; s < k; ++s) a.states[s] = call.states[s][i].data_ptr();
    return a;
  }
  const std::vector<at::Tensor> flat = flat_update_arrays(flat_tensors, call, i);
  a.param = flat[0].data_ptr();
  a.grad = flat[1].const_data_ptr();
  for (size_t s = 0; s < k; ++s) a.states[s] = flat[2 + s].data_ptr();
  return a;
}

template <class Rule>
struct CpuDriver {
  static void run(const UpdateCall& call, const typename Rule::Hyper& hyper) {
    const HostScalars host = HostScalars::read(call.lr, call.lr_tensor, call.clip_coef,
                                               call.grad_scale, call.found_inf);
    // A skipped step changes nothing, not even the step counters.
    if (host.skip) return;
    const size_t n = call.params.size();
    const size_t k = call.states.size();

    // Mixed precision (masters, stochastic rounding, states of another
    // dtype): the float32 kernel on float32 blocks (run_mixed_chunk).
    const bool mixed = call.mixed();

    FlatTensors flat_tensors;
    std::vector<TensorArrays> arrays(mixed ? 0 : n);
    std::vector<MixedTensor> mixed_tensors(mixed ? n : 0);
    std::vector<TensorWork<Rule>> work(n);
    // The rule's scalars depend on the step alone, which the tensors of a
    // call mostly share: folded again only where it changes.
    double scalars_step = 0.0;
    typename Rule::template Scalars<double> step_scalars{};
    for (size_t i = 0; i < n; ++i) {
      if (mixed) {
        mixed_tensors[i] = mixed_tensor(flat_tensors, call, i);
      } else {
        arrays[i] = tensor_arrays(flat_tensors, call, i);
      }
      const double step = call.steps.empty() ? 0.0 : increment_step(call.steps[i]);
      if (i == 0 || step != scalars_step) {
        step_scalars = Rule::scalars(hyper, host.lr, step);
        scalars_step = step;
      }
      work[i].scalars = step_scalars;
      work[i].mult =
          tensor_mult(host.grad_mult(i, call.maximize), call.unit_coefs, i, call.params[i]);
    }

    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, mixed ? at::kFloat : call.params[0].scalar_type(),
        "fusedclip_update_cpu", [&] {
          using L = Lanes<scalar_t>;
          using opmath_t = typename L::opmath_t;
          using OpVec = typename L::OpVec;
          Rule::dispatch(hyper, [&](auto variant) {
            using V = decltype(variant);
            static_assert(V::kStates <= max_states<Rule>(),
                          "a variant keeps more states than its rule's kStateNames names");
            TORCH_INTERNAL_ASSERT(static_cast<size_t>(V::kStates) == k, Rule::kName,
                                  ": the variant's kStates is not Hyper::num_states()");
            dispatch_grad_transforms<Rule>(call.transforms, [&](const auto& active) {
              using Active = std::decay_t<decltype(active)>;
              const auto tail_transforms = active.template as<opmath_t>();
              const auto transforms = tail_transforms.template as<OpVec>();
              for_each_tensor_chunk(call.params, [&](int64_t t, int64_t begin, int64_t end) {
                const auto tail_s = work[t].scalars.template as<opmath_t>();
                const auto s = tail_s.template as<OpVec>();
                // Elements [rb, re) of tensor t, whose arrays `a` hold.
                const auto kernel = [&](const TensorArrays& a, int64_t rb, int64_t re) {
                  for_each_unit_run(rb, re, work[t].mult, [&](int64_t b, int64_t e, double mult) {
                    const opmath_t tail_mult = static_cast<opmath_t>(mult);
                    cpu::run<scalar_t, Rule, V, Active>(a, b - a.offset, e - a.offset, s,
                                                        OpVec(tail_mult), transforms, tail_s,
                                                        tail_mult, tail_transforms);
                  });
                };
                if constexpr (std::is_same_v<scalar_t, float>) {
                  if (mixed) {
                    run_mixed_chunk(mixed_tensors[t], call.params[t].numel(), begin, end,
                                    kernel);
                    return;
                  }
                }
                kernel(arrays[t], begin, end);
              });
            });
          });
        });
    flat_tensors.copy_home();
    // The generators move on once the call is done (a skipped call returned
    // above: it moves nothing).
    if (call.sr_generators.has_value()) {
      for (const at::Tensor& gen : *call.sr_generators) ++gen.data_ptr<int64_t>()[1];
    }
  }
};

}  // namespace

// This vector set's update ops, one per rule, for dispatch.cpp (kernels.h).
void add_update_kernels(CpuKernels& kernels) {
  int i = 0;
#define FUSEDCLIP_ADD_UPDATE(Rule) kernels.update[i++] = &UpdateOp<Rule, CpuDriver>::call;
  FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_ADD_UPDATE)
#undef FUSEDCLIP_ADD_UPDATE
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
