// The tensors of one parameter (param, grad, states) as flat-walkable arrays,
// for every backend's update driver.
#pragma once

#include <utility>
#include <vector>

#include <ATen/ATen.h>

namespace fusedclip {

// Whether tensors can be walked as one flat array each, as they are, with
// element k of one element k of the others: `first` dense and non-overlapping
// (contiguous, channels-last, a transpose, ...) and `t` of its strides; where
// `row_major`, both contiguous (row-major) instead. FlatTensors::take and the
// drivers' fast paths ask this of every tensor of a parameter.
inline bool walkable_first(const at::Tensor& first, bool row_major) {
  return row_major ? first.is_contiguous() : first.is_non_overlapping_and_dense();
}
inline bool walkable_like(const at::Tensor& t, const at::Tensor& first, bool row_major) {
  return row_major ? t.is_contiguous() : t.strides() == first.strides();
}

// Where the tensors of a parameter do not share a dense layout, contiguous
// copies stand in, and the copies of written tensors are queued to be copied
// home after the kernel: the parameter is always updated in its own storage.
// `row_major` asks for the contiguous (row-major) layout itself, where a unit
// (an index of dim 0) is a run of numel / size(0) elements: per-unit
// coefficients need it, and other dense layouts then get stand-ins too.
class FlatTensors {
 public:
  std::vector<at::Tensor> take(std::vector<at::Tensor> tensors,
                               const std::vector<bool>& written,
                               bool row_major = false) {
    bool as_they_are = walkable_first(tensors.front(), row_major);
    for (const at::Tensor& t : tensors) {
      as_they_are = as_they_are && walkable_like(t, tensors.front(), row_major);
    }
    if (as_they_are) return tensors;
    std::vector<at::Tensor> flat;
    flat.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      flat.push_back(tensors[i].contiguous());
      if (flat.back().is_same(tensors[i])) continue;
      if (written[i]) {
        write_back_.emplace_back(tensors[i], flat.back());
      } else {
        read_only_.push_back(flat.back());  // alive until the kernel is done
      }
    }
    return flat;
  }

  void copy_home() {
    for (auto& [home, copy] : write_back_) home.copy_(copy);
    write_back_.clear();
    read_only_.clear();
  }

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back_;
  std::vector<at::Tensor> read_only_;
};

}  // namespace fusedclip
