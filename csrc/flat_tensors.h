// The tensors of one parameter (param, grad, states) as flat-walkable arrays,
// for every backend's update driver.
#pragma once

#include <utility>
#include <vector>

#include <ATen/ATen.h>

namespace fusedclip {

// True when every tensor can be walked as one flat array and element k of one
// is element k of the others: all share the strides of a dense,
// non-overlapping layout (contiguous, channels-last, a transpose, ...).
inline bool share_dense_layout(const std::vector<at::Tensor>& tensors) {
  const at::Tensor& first = tensors.front();
  if (!first.is_non_overlapping_and_dense()) return false;
  for (const at::Tensor& t : tensors) {
    if (t.strides() != first.strides()) return false;
  }
  return true;
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
    if (row_major) {
      bool all_contiguous = true;
      for (const at::Tensor& t : tensors) all_contiguous = all_contiguous && t.is_contiguous();
      if (all_contiguous) return tensors;
    } else if (share_dense_layout(tensors)) {
      return tensors;
    }
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
