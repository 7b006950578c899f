// What every CUDA update kernel shares besides the launcher: small per-call
// values read by the kernel from device memory (lr_tensor, clip_coef,
// grad_scale, found_inf), and per-tensor step counters, read by the update
// launch and incremented by a second launch after it, so that no host ever
// waits and no block sees a counter another block has already incremented.
#pragma once

#include <vector>

#include <ATen/ATen.h>

#include "../update_op.h"
#include "fusedclip/grad_transform.h"
#include "multi_tensor_apply.cuh"

namespace fusedclip::cuda {

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

// The per-call values every update kernel reads from device memory.
struct CallScalars {
  double lr;  // used where lr_tensor is absent
  bool maximize;
  DeviceScalar lr_tensor, clip_coef, grad_scale, found_inf;

  // An lr tensor on the CPU is read here, on the host: no device sync, and no
  // copy to the device (from pageable memory, that would be one). In a CUDA
  // graph its value at capture then stays, as for torch's fused optimizers;
  // an lr tensor on the device is read by the kernel at every replay. A
  // negative value on the CPU is refused here; on the device it is not
  // checked (that would take a sync): the Python optimizers check a CPU one,
  // and document that a device one is the caller's to keep >= 0.
  static CallScalars of(const UpdateCall& call) {
    double lr = call.lr;
    std::optional<at::Tensor> device_lr = call.lr_tensor;
    if (call.lr_tensor.has_value() && call.lr_tensor->device().is_cpu()) {
      lr = read_cpu_scalar(*call.lr_tensor);
      TORCH_CHECK(lr >= 0.0, "fusedclip: invalid learning rate ", lr,
                  " in lr_tensor (must be >= 0)");
      device_lr.reset();
    }
    return {lr, call.maximize, DeviceScalar::of(device_lr), DeviceScalar::of(call.clip_coef),
            DeviceScalar::of(call.grad_scale), DeviceScalar::of(call.found_inf)};
  }

  __device__ __forceinline__ bool skip() const { return found_inf.load(0, 0.0) != 0.0; }
  __device__ __forceinline__ double learning_rate() const { return lr_tensor.load(0, lr); }
  // What tensor `tensor`'s gradient is multiplied by, as the CPU kernels fold it.
  __device__ __forceinline__ double grad_mult(int64_t tensor) const {
    return fusedclip::grad_mult(clip_coef.load(tensor, 1.0), 1.0 / grad_scale.load(0, 1.0),
                                maximize);
  }
};

// The count a step counter will hold after this step's increment, computed in
// the counter's own dtype as the CPU kernels' ++ does.
__device__ __forceinline__ double next_step(const void* step_ptr, bool is_double) {
  return is_double ? *static_cast<const double*>(step_ptr) + 1.0
                   : static_cast<double>(*static_cast<const float*>(step_ptr) + 1.0f);
}

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

// The step counters of one call. The kernels read and write all counters of a
// call as one dtype: where a call mixes float32 and float64 counters, float64
// copies stand in and are copied home after the increment (float32 counts
// convert exactly).
class StepCounters {
 public:
  explicit StepCounters(at::TensorList steps) : home_(steps.begin(), steps.end()) {
    for (const at::Tensor& s : home_) {
      mixed_ = mixed_ || s.scalar_type() != home_[0].scalar_type();
    }
    work_ = home_;
    if (mixed_) {
      for (at::Tensor& s : work_) s = s.to(at::kDouble);
    }
  }

  bool empty() const { return work_.empty(); }
  bool is_double() const { return !work_.empty() && work_[0].scalar_type() == at::kDouble; }
  // Read only by the update launch; written by increment().
  void* ptr(size_t i) const { return const_cast<void*>(work_[i].const_data_ptr()); }

  // Launch after the update, never before it: see the top of this file.
  void increment(const DeviceScalar& found_inf) {
    if (work_.empty()) return;
    std::vector<TensorRef<1>> refs(work_.size());
    for (size_t i = 0; i < work_.size(); ++i) refs[i] = {{work_[i].data_ptr()}, 1};
    // One warp per counter is plenty: a single thread does the work.
    constexpr int kStepThreads = 32;
    if (is_double()) {
      multi_tensor_apply<1>(refs, StepIncrementFunctor<double>{found_inf}, kChunkSize,
                            kStepThreads);
    } else {
      multi_tensor_apply<1>(refs, StepIncrementFunctor<float>{found_inf}, kChunkSize,
                            kStepThreads);
    }
    if (mixed_) {
      for (size_t i = 0; i < home_.size(); ++i) {
        if (!work_[i].is_same(home_[i])) home_[i].copy_(work_[i]);
      }
    }
  }

 private:
  std::vector<at::Tensor> home_;
  std::vector<at::Tensor> work_;
  bool mixed_ = false;
};

}  // namespace fusedclip::cuda
