// The CUDA driver of every update rule (include/fusedclip/rule.h), registered
// once per rule of rules.h, with the CPU driver's semantics
// (cpu/update_cpu.cpp) and no host sync: every value the CPU driver reads on
// the host (found_inf, a device lr_tensor, grad_scale, clip_coef, the step
// counters) is read here by the kernel itself, from device memory.
//
// Two kinds of launch, in this order on the current stream:
//   1. the update: one block per chunk (multi_tensor_apply.cuh); the block
//      folds its tensor's scalars with Rule::scalars and its gradient
//      multiplier, then applies the rule's variant to every element;
//   2. the step increment: one block per step counter adds 1; then, with
//      stochastic rounding, one block per sr generator adds 1 to its counter.
// The update reads each counter and uses its value + 1 (an sr generator's
// counter: its value, the one before this call's increment); the counters are
// only written by the increment launches, which start after every block of
// the update has finished, so no block can see a counter already incremented.
// Where found_inf is non-zero every launch leaves everything as it was.
//
// A call whose arrays do not all share the parameters' dtype, or that has
// masters or sr_generators (UpdateCall::mixed(), issue 20), runs its own
// kernel, MixedUpdateFunctor: float32 math, each array loaded and stored in
// its own dtype (mixed_precision.cuh), the dtypes runtime values of the
// kernel argument; so do float16 calls of one dtype (the same arithmetic as
// their UpdateFunctor had: see CudaDriver::run). Every other call (float32,
// float64, bfloat16) runs UpdateFunctor, one kernel per dtype, as before.
#include <array>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../update_op.h"
#include "device_scalars.cuh"
#include "fusedclip/grad_transform.h"
#include "fusedclip/rules.h"
#include "grad_transform.cuh"
#include "mixed_precision.cuh"
#include "multi_tensor_apply.cuh"

namespace fusedclip::cuda {
namespace {

// A tensor's own values, in their slots of the launch metadata.
struct UpdateSlot {
  const void* step = nullptr;  // its step counter (null: the rule counts none)
  UnitCoefSlot units;          // its per-unit coefficients
};

// The arguments of one call, as the kernels need them. Active: the call's
// element-wise transforms (ActiveTransforms<double, ...>), with their numbers.
template <class Rule, class Active>
struct UpdateArgs {
  typename Rule::Hyper hyper;
  bool step_is_double;  // all counters of the call have one dtype (StepCounters)
  bool unit_is_double;  // all unit coefficients of the call have one dtype (checked)
  CallScalars call;
  Active transforms;
};

template <class Rule, class V, typename scalar_t, class Active>
struct UpdateFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  using Scalars = typename Rule::template Scalars<opmath_t>;
  // Element arrays handed to the rule: param, grad, then its states. All but
  // the gradient are written.
  static constexpr int kArrays = 2 + V::kStates;
  static_assert(kArrays < 32, "kWriteMask has one bit per array");
  static constexpr unsigned kWriteMask = ((1u << kArrays) - 1u) & ~(1u << 1);

  UpdateArgs<Rule, Active> args;

  __device__ __forceinline__ void operator()(const TensorListMetadata<kArrays, UpdateSlot>& meta,
                                             const ChunkRef& c) const {
    // A skipped step writes nothing. All threads read the same flag, so the
    // whole block leaves together, before the barrier below.
    if (args.call.skip()) return;

    // The per-tensor numbers, folded once per block by one thread, exactly
    // as the CPU driver folds them (in double, then rounded to the math type).
    __shared__ Scalars shared_scalars;
    __shared__ double shared_mult;
    const UpdateSlot& slot = meta.extra[c.slot];
    if (threadIdx.x == 0) {
      // The count after this step's increment; the counter itself is written
      // by the increment launch that follows.
      const double step =
          slot.step == nullptr ? 0.0 : next_step(slot.step, args.step_is_double);
      shared_scalars =
          Rule::scalars(args.hyper, args.call.learning_rate(), step).template as<opmath_t>();
      shared_mult = args.call.grad_mult(c.tensor);
    }
    __syncthreads();
    const Scalars s = shared_scalars;
    const ChunkMult<opmath_t> mult(shared_mult, slot.units, c.begin, args.unit_is_double);
    const auto transforms = args.transforms.template as<opmath_t>();

    scalar_t* ptrs[kArrays];
#pragma unroll
    for (int a = 0; a < kArrays; ++a) {
      ptrs[a] = static_cast<scalar_t*>(meta.addresses[a][c.slot]) + c.begin;
    }
    chunk_foreach<scalar_t, kArrays, kWriteMask>(ptrs, c.size, [&](opmath_t(&x)[kArrays], int i) {
      const opmath_t grad = transforms.template apply<Rule>(mult(x[1], i), x + 2);
      V::template update<false>(x[0], grad, x + 2, s);
    });
  }
};

// -- mixed precision ---------------------------------------------------------------

// The storage of every array of a mixed call: one per list, for every tensor.
struct MixedStores {
  Storage param;               // the parameters' and the gradients'
  Storage states[kMaxStates];  // each state list's
  MasterKind master;
  bool stochastic;  // sr_generators: bf16/fp16 writes rounded stochastically
};

// A tensor's own values in a mixed call: UpdateSlot's, and its sr generator
// ([seed, counter], int64; null without stochastic rounding).
struct MixedSlot {
  UpdateSlot update;
  const int64_t* sr = nullptr;
};

// The mixed-precision update of one chunk: the rule's variant in float32 on
// every element, each array loaded and stored in its own storage (stores), the
// parameter's value read from and written to its master where there is one
// (include/fusedclip/precision.h has the roundings). Arrays: param, grad, the
// states, then the master (null without).
template <class Rule, class V, class Active>
struct MixedUpdateFunctor {
  using Scalars = typename Rule::template Scalars<float>;
  static constexpr int kStates = V::kStates;
  static constexpr int kArrays = 2 + kStates;  // what the rule sees
  static constexpr int kDepth = kArrays + 1;   // and the master
  static constexpr int kMaster = kArrays;
  static constexpr int G = kMixedGroup;

  UpdateArgs<Rule, Active> args;
  MixedStores stores;

  __device__ __forceinline__ Storage store_of(int a) const {
    return a < 2 ? stores.param : stores.states[a - 2];
  }

  __device__ __forceinline__ void operator()(const TensorListMetadata<kDepth, MixedSlot>& meta,
                                             const ChunkRef& c) const {
    if (args.call.skip()) return;

    // The per-tensor numbers, as UpdateFunctor folds them, and the keys of
    // the random bits of the parameter (slot 0) and each state (1 + k).
    __shared__ Scalars shared_scalars;
    __shared__ double shared_mult;
    __shared__ precision::SrKey shared_keys[1 + kStates];
    const MixedSlot& slot = meta.extra[c.slot];
    if (threadIdx.x == 0) {
      const double step = slot.update.step == nullptr
                              ? 0.0
                              : next_step(slot.update.step, args.step_is_double);
      shared_scalars =
          Rule::scalars(args.hyper, args.call.learning_rate(), step).template as<float>();
      shared_mult = args.call.grad_mult(c.tensor);
      if (stores.stochastic) {
        // The counter before this call's increment (the increment launch
        // writes it after this launch). A chunk never crosses a multiple of
        // 2^32 elements, so the high bits of its elements' indices are
        // folded into the keys here, once (sr_key_high, sr_bits_low).
        static_assert((int64_t(1) << 32) % kChunkSize == 0, "chunks cross 2^32 boundaries");
        const int64_t seed = slot.sr[0];
        const int64_t counter = slot.sr[1];
#pragma unroll
        for (int a = 0; a <= kStates; ++a) {
          shared_keys[a] = precision::sr_key_high(precision::sr_key(seed, counter, a), c.begin);
        }
      }
    }
    __syncthreads();
    const Scalars s = shared_scalars;
    const ChunkMult<float> mult(shared_mult, slot.update.units, c.begin, args.unit_is_double);
    const auto transforms = args.transforms.template as<float>();
    const MasterKind master = stores.master;
    const bool stochastic = stores.stochastic;  // for the bf16/fp16 arrays
    const bool sr_param = stochastic && master == MasterKind::None && stores.param != Storage::F32;

    char* ptr[kDepth];
    int bytes[kDepth];
    bool aligned = true;
#pragma unroll
    for (int a = 0; a < kDepth; ++a) {
      bytes[a] = a == kMaster ? master_bytes(master) : storage_bytes(store_of(a));
      ptr[a] = static_cast<char*>(meta.addresses[a][c.slot]);
      if (a == kMaster && master == MasterKind::None) continue;
      ptr[a] += c.begin * bytes[a];
      aligned = aligned && group_aligned(ptr[a], bytes[a]);
    }

    const int n = c.size;
    for (int i = static_cast<int>(threadIdx.x) * G; i < n; i += static_cast<int>(blockDim.x) * G) {
      const bool whole = aligned && i + G <= n;
      float x[kArrays][G];

      // The parameter's float32 value: its master's where it has one.
      uint32_t raw[G];
      if (master == MasterKind::Full) {
        load_group(ptr[kMaster], 4, i, n, whole, raw);
#pragma unroll
        for (int k = 0; k < G; ++k) x[0][k] = precision::bits_float(raw[k]);
      } else {
        load_group(ptr[0], bytes[0], i, n, whole, raw);
        if (master == MasterKind::Remainder) {
          uint32_t rem[G];
          load_group(ptr[kMaster], 2, i, n, whole, rem);
#pragma unroll
          for (int k = 0; k < G; ++k) {
            x[0][k] = precision::bits_float(
                precision::bf16_rebuild(static_cast<uint16_t>(raw[k]),
                                        static_cast<int16_t>(static_cast<uint16_t>(rem[k]))));
          }
        } else {
#pragma unroll
          for (int k = 0; k < G; ++k) x[0][k] = raw_to_float(stores.param, raw[k]);
        }
      }
#pragma unroll
      for (int a = 1; a < kArrays; ++a) {
        load_group(ptr[a], bytes[a], i, n, whole, raw);
        const Storage st = store_of(a);
#pragma unroll
        for (int k = 0; k < G; ++k) x[a][k] = raw_to_float(st, raw[k]);
      }

#pragma unroll
      for (int k = 0; k < G; ++k) {
        float e[kArrays];
#pragma unroll
        for (int a = 0; a < kArrays; ++a) e[a] = x[a][k];
        const float grad = transforms.template apply<Rule>(mult(e[1], i + k), e + 2);
        V::template update<false>(e[0], grad, e + 2, s);
#pragma unroll
        for (int a = 0; a < kArrays; ++a) x[a][k] = e[a];
      }

      // The low 32 bits of the tensor index of element k of the group: low + k.
      const uint32_t low = static_cast<uint32_t>(c.begin + i);

      // The parameter (and its master): rounded to nearest from a master
      // (bf16: ties away from zero, so that the remainder rebuilds it),
      // stochastically without one where asked.
      if (master == MasterKind::None) {
#pragma unroll
        for (int k = 0; k < G; ++k) {
          raw[k] = sr_param ? stochastic_raw(stores.param, x[0][k],
                                             precision::sr_bits_low(shared_keys[0], low + k))
                            : float_to_raw(stores.param, x[0][k]);
        }
      } else {
        uint32_t kept[G];  // the master, or its low 16 bits
#pragma unroll
        for (int k = 0; k < G; ++k) {
          const uint32_t m = precision::float_bits(x[0][k]);
          kept[k] = master == MasterKind::Remainder
                        ? static_cast<uint16_t>(precision::bf16_remainder(m))
                        : m;
          raw[k] = stores.param == Storage::BF16 ? precision::bf16_round_half_away(m)
                                                 : float_to_raw(stores.param, x[0][k]);
        }
        store_group(ptr[kMaster], bytes[kMaster], i, n, whole, kept);
      }
      store_group(ptr[0], bytes[0], i, n, whole, raw);

#pragma unroll
      for (int a = 2; a < kArrays; ++a) {
        const Storage st = store_of(a);
        const bool sr = stochastic && st != Storage::F32;
#pragma unroll
        for (int k = 0; k < G; ++k) {
          raw[k] = sr ? stochastic_raw(st, x[a][k],
                                       precision::sr_bits_low(shared_keys[a - 1], low + k))
                      : float_to_raw(st, x[a][k]);
        }
        store_group(ptr[a], bytes[a], i, n, whole, raw);
      }
    }
  }
};

// Adds 1 to the counter of each sr generator ([seed, counter]), unless the
// step is skipped: after the update, never during it (see the top of this file).
void increment_sr_counters(at::TensorList generators, const DeviceScalar& found_inf) {
  std::vector<TensorRef<1>> refs(generators.size());
  for (size_t i = 0; i < generators.size(); ++i) {
    refs[i] = {{static_cast<int64_t*>(generators[i].data_ptr()) + 1}, 1};
  }
  constexpr int kCounterThreads = 32;
  multi_tensor_apply<1>(refs, StepIncrementFunctor<int64_t>{found_inf}, kChunkSize,
                        kCounterThreads);
}

template <class Rule>
struct CudaDriver {
  static void run(const UpdateCall& call, const typename Rule::Hyper& hyper) {
    const c10::cuda::CUDAGuard device_guard(call.params[0].device());
    const size_t n = call.params.size();
    const bool units = call.unit_coefs.has_value();

    StepCounters counters(call.steps);
    const bool step_is_double = counters.is_double();
    const bool unit_is_double =
        units && !call.unit_coefs->empty() && (*call.unit_coefs)[0].scalar_type() == at::kDouble;
    const CallScalars call_scalars = CallScalars::of(call);

    // Parameters whose param, grad and states do not share one dense layout
    // are updated through contiguous copies, copied home after the kernel, as
    // on the CPU; per-unit coefficients need row-major runs.
    FlatTensors flat_tensors;
    std::vector<at::Tensor> coefs;  // contiguous unit coefficients, alive until queued
    std::vector<std::vector<at::Tensor>> flat(n);
    std::vector<UpdateSlot> slots(n);
    // float16 calls of one dtype run the mixed kernel too: the same
    // arithmetic as a float16 UpdateFunctor (c10's exact widening, float32
    // math, c10's round-to-nearest-even store; no master, no stochastic
    // rounding), and one kernel fewer per (rule, variant, transforms) pays
    // for the mixed one in compile time.
    const bool mixed = call.mixed() || call.params[0].scalar_type() == at::kHalf;
    for (size_t i = 0; i < n; ++i) {
      flat[i] = flat_update_arrays(flat_tensors, call, i);
      if (!call.steps.empty()) slots[i].step = counters.ptr(i);
      if (units) {
        coefs.push_back((*call.unit_coefs)[i].contiguous());
        slots[i].units = {coefs.back().const_data_ptr(), unit_length(call.params[i])};
      }
    }

    if (mixed) {
      run_mixed(call, hyper, flat, slots, step_is_double, unit_is_double, call_scalars);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND(
          at::kBFloat16, call.params[0].scalar_type(), "fusedclip_update_cuda", [&] {
            // The variant and the active element-wise transforms are chosen
            // once per call, on the host: template parameters of the kernel.
            Rule::dispatch(hyper, [&](auto variant) {
              using V = decltype(variant);
              static_assert(V::kStates <= max_states<Rule>(),
                            "a variant keeps more states than its rule's kStateNames names");
              TORCH_INTERNAL_ASSERT(static_cast<size_t>(V::kStates) == call.states.size(),
                                    Rule::kName,
                                    ": the variant's kStates is not Hyper::num_states()");
              constexpr int kArrays = 2 + V::kStates;
              std::vector<TensorRef<kArrays, UpdateSlot>> refs(n);
              for (size_t i = 0; i < n; ++i) {
                for (int a = 0; a < kArrays; ++a) refs[i].ptrs[a] = flat[i][a].data_ptr();
                refs[i].numel = call.params[i].numel();
                refs[i].extra = slots[i];
              }
              // A transform with an identity form runs in every kernel (the
              // identity when off): ALU is spare here, compile time is not.
              dispatch_grad_transforms<Rule, OffTransforms::kRunIdentity>(
                  call.transforms, [&](const auto& active) {
                    using Active = std::decay_t<decltype(active)>;
                    const UpdateArgs<Rule, Active> args{hyper, step_is_double, unit_is_double,
                                                        call_scalars, active};
                    multi_tensor_apply<kArrays>(
                        refs, UpdateFunctor<Rule, V, scalar_t, Active>{args});
                  });
            });
          });
    }

    // After the update, never during it: see the top of this file.
    counters.increment(call_scalars.found_inf);
    if (call.sr_generators.has_value()) {
      increment_sr_counters(*call.sr_generators, call_scalars.found_inf);
    }
    flat_tensors.copy_home();
  }

  // A mixed call (UpdateCall::mixed()): one MixedUpdateFunctor kernel per
  // (variant, transforms), whatever the dtypes; `flat` holds each tensor's
  // param, grad, states and, with masters, its master (flat_update_arrays).
  static void run_mixed(const UpdateCall& call, const typename Rule::Hyper& hyper,
                        const std::vector<std::vector<at::Tensor>>& flat,
                        const std::vector<UpdateSlot>& slots, bool step_is_double,
                        bool unit_is_double, const CallScalars& call_scalars) {
    const size_t n = call.params.size();
    MixedStores stores{};
    stores.param = storage_of(call.params[0].scalar_type());
    TORCH_INTERNAL_ASSERT(call.states.size() <= static_cast<size_t>(kMaxStates));
    for (size_t k = 0; k < call.states.size(); ++k) {
      stores.states[k] = storage_of(call.states[k][0].scalar_type());
    }
    stores.master = !call.masters.has_value()                       ? MasterKind::None
                    : (*call.masters)[0].scalar_type() == at::kShort ? MasterKind::Remainder
                                                                     : MasterKind::Full;
    stores.stochastic = call.sr_generators.has_value();

    Rule::dispatch(hyper, [&](auto variant) {
      using V = decltype(variant);
      TORCH_INTERNAL_ASSERT(static_cast<size_t>(V::kStates) == call.states.size(), Rule::kName,
                            ": the variant's kStates is not Hyper::num_states()");
      constexpr int kDepth = 3 + V::kStates;  // param, grad, states, master
      std::vector<TensorRef<kDepth, MixedSlot>> refs(n);
      for (size_t i = 0; i < n; ++i) {
        for (int a = 0; a < kDepth - 1; ++a) refs[i].ptrs[a] = flat[i][a].data_ptr();
        refs[i].ptrs[kDepth - 1] =
            stores.master == MasterKind::None ? nullptr : flat[i][kDepth - 1].data_ptr();
        refs[i].numel = call.params[i].numel();
        refs[i].extra.update = slots[i];
        if (stores.stochastic) {
          refs[i].extra.sr = (*call.sr_generators)[i].const_data_ptr<int64_t>();
        }
      }
      dispatch_grad_transforms<Rule, OffTransforms::kRunIdentity>(
          call.transforms, [&](const auto& active) {
            using Active = std::decay_t<decltype(active)>;
            const UpdateArgs<Rule, Active> args{hyper, step_is_double, unit_is_double,
                                                call_scalars, active};
            multi_tensor_apply<kDepth>(refs, MixedUpdateFunctor<Rule, V, Active>{args, stores});
          });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  register_update_ops<CudaDriver>(m);
}

}  // namespace fusedclip::cuda
