// The CPU multi-tensor driver: many tensors become one flat list of equal-size
// chunks, run in a single parallel region, so a thousand small tensors cost
// one thread fork, not a thousand, and threads get balanced work.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace fusedclip::cpu {

// Elements per work item of the update passes: the four fp32 arrays of an
// Adam chunk (param, grad, two moments) take 256 KiB, well inside a core's L2.
constexpr int64_t kChunkSize = 16384;
// Below this many elements in all, a thread fork costs more than it saves.
constexpr int64_t kMinParallelElements = 65536;

struct Chunk {
  int64_t tensor;  // index into the op's tensor lists
  int64_t begin;   // element offset in that tensor's memory order
  int64_t end;
};

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels,
                                      int64_t chunk_size = kChunkSize) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += chunk_size) {
      chunks.push_back({static_cast<int64_t>(t), b,
                        std::min(b + chunk_size, numels[t])});
    }
  }
  return chunks;
}

// Runs fn(chunk_index) for every chunk, in one parallel region.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t total_numel,
                    const F& fn) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  if (total_numel < kMinParallelElements) {
    for (int64_t c = 0; c < n; ++c) fn(c);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c);
  });
}

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

// The tensors of one parameter (param, grad, states) as flat-walkable tensors.
// Where they do not share a dense layout, contiguous copies stand in, and the
// copies of written tensors are queued in `write_back` to be copied home after
// the kernel: the parameter is always updated in its own storage.
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

// The update kernels' driver: runs fn(tensor, begin, end) for every chunk of
// `tensors` (element ranges in each tensor's memory order), in one parallel
// region.
template <typename F>
void for_each_tensor_chunk(at::TensorList tensors, const F& fn) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  int64_t total_numel = 0;
  for (const at::Tensor& t : tensors) {
    numels.push_back(t.numel());
    total_numel += t.numel();
  }
  const std::vector<Chunk> chunks = make_chunks(numels);
  for_each_chunk(chunks, total_numel, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    fn(ch.tensor, ch.begin, ch.end);
  });
}

}  // namespace fusedclip::cpu
