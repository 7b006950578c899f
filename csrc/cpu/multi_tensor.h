// The CPU multi-tensor driver: many tensors become one flat list of equal-size
// chunks, run in a single parallel region, so a thousand small tensors cost
// one thread fork, not a thousand, and threads get balanced work.
#pragma once

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "capability.h"

namespace fusedclip::cpu {
inline namespace CPU_CAPABILITY {  // capability.h

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

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
