// The one generic multi-tensor launcher of the CUDA kernels.
//
// An op hands over, per tensor, DEPTH device pointers to element arrays
// (param, grad, states, ...), an element count, and a small struct of the
// tensor's own values (Extra: a step counter's address, a unit length, ...),
// each in a slot of its own. The tensors are cut into chunks of `chunk_size`
// elements and every CUDA block takes one chunk. Which block takes which
// (tensor, chunk) is written into tables that travel with the pointers as the
// kernel's argument, so nothing is copied to the device before a launch: the
// host never waits, and a step can be captured in a CUDA graph. A call with more
// tensors or chunks than one argument holds becomes several launches, one after
// the other on the current stream.
//
// A functor receives the argument struct and a ChunkRef (which tensor, which
// chunk) and only loads, calls the shared math of include/fusedclip/, and
// stores; chunk_foreach() below does the loads and stores for it, 16 bytes at a
// time where the chunk's pointers allow.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

namespace fusedclip::cuda {

// Threads of an element-wise block (the most any launch may ask for).
constexpr int kBlockSize = 512;
// Elements per chunk, i.e. per block: 128 per thread, enough work to hide the
// cost of starting a block. A multiple of 16, so a chunk of a 16-byte-aligned
// tensor starts 16-byte aligned for every dtype.
constexpr int64_t kChunkSize = 65536;
// Offsets within a chunk are 32-bit (fewer registers in the element loops);
// the chunk's own offset in its tensor is 64-bit, so tensors of any size work.
constexpr int64_t kMaxChunkSize = int64_t(1) << 30;
// Blocks per launch: one to two waves of 512-thread blocks on an A100/H100,
// and the per-block tables stay small.
constexpr int kMaxBlocksPerLaunch = 320;
// Kernel arguments must fit in 4 KiB (the limit before CUDA 12.1, and with
// older drivers); the functor gets what the metadata leaves.
constexpr int kMaxKernelArgBytes = 4096;
constexpr int kFunctorArgBytes = 256;

// A tensor without values of its own.
struct NoExtra {};

// Tensors one launch can take: what is left of the argument space after the
// per-block tables, divided by the per-tensor cost (DEPTH pointers, the Extra
// values, the element count, the list index). Blocks name their tensor's slot
// in one byte, hence at most 255.
constexpr int max_tensors_per_launch(int depth, int extra_bytes) {
  const int per_block = sizeof(int32_t) + sizeof(uint8_t);
  const int fixed = 2 * sizeof(int64_t) + kMaxBlocksPerLaunch * per_block;
  const int per_tensor =
      depth * sizeof(void*) + extra_bytes + sizeof(int64_t) + sizeof(int32_t);
  const int n = (kMaxKernelArgBytes - kFunctorArgBytes - fixed) / per_tensor;
  return n < 255 ? n : 255;
}

// The kernel argument of one launch.
template <int DEPTH, typename Extra = NoExtra>
struct TensorListMetadata {
  static constexpr int kMaxTensors =
      max_tensors_per_launch(DEPTH, std::is_empty_v<Extra> ? 0 : sizeof(Extra));
  static_assert(kMaxTensors > 0, "multi_tensor_apply: DEPTH arrays per tensor leave no room "
                                 "for one tensor in the kernel argument");

  void* addresses[DEPTH][kMaxTensors];  // [array][slot]: element arrays
  Extra extra[std::is_empty_v<Extra> ? 1 : kMaxTensors];  // each slot's own values
  int64_t numel[kMaxTensors];           // elements of each slot's tensor
  int64_t chunk_size;
  int64_t block_offset;                 // blocks of this call in earlier launches
  int32_t tensor_index[kMaxTensors];    // each slot's index in the op's lists
  int32_t block_chunk[kMaxBlocksPerLaunch];  // chunk of the block's tensor
  uint8_t block_slot[kMaxBlocksPerLaunch];   // slot of the block's tensor
};

// What one block works on.
struct ChunkRef {
  int slot;              // column of the metadata arrays
  int64_t tensor;        // index in the op's lists (for per-tensor values)
  int64_t chunk;         // chunk index within the tensor
  int64_t begin;         // first element of the chunk
  int size;              // elements in the chunk (chunk_size but at the end)
  int64_t global_block;  // position among all chunks of the call: tensor by
                         // tensor, chunk by chunk (a fixed order)
};

// One tensor as the launcher sees it: a pointer per element array, the
// element count (of array 0, which decides the chunks; the other arrays have at
// least as many elements), and the tensor's own values.
template <int DEPTH, typename Extra = NoExtra>
struct TensorRef {
  void* ptrs[DEPTH];
  int64_t numel;
  Extra extra{};
};

template <int DEPTH, typename Extra, typename Functor>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(const TensorListMetadata<DEPTH, Extra> meta, const Functor functor) {
  const int block = blockIdx.x;
  ChunkRef c;
  c.slot = meta.block_slot[block];
  c.tensor = meta.tensor_index[c.slot];
  c.chunk = meta.block_chunk[block];
  c.begin = c.chunk * meta.chunk_size;
  const int64_t left = meta.numel[c.slot] - c.begin;
  c.size = static_cast<int>(left < meta.chunk_size ? left : meta.chunk_size);
  c.global_block = meta.block_offset + block;
  functor(meta, c);
}

// Runs functor(meta, chunk) once per chunk of every tensor. Empty tensors get
// no block at all. Launches go to the current stream of the current device
// (the caller sets the device, e.g. with c10::cuda::CUDAGuard).
template <int DEPTH, typename Extra, typename Functor>
void multi_tensor_apply(const std::vector<TensorRef<DEPTH, Extra>>& tensors,
                        const Functor& functor, int64_t chunk_size = kChunkSize,
                        int block_size = kBlockSize) {
  using Meta = TensorListMetadata<DEPTH, Extra>;
  // Kernel parameters are padded to their alignment; 16 bytes cover that.
  static_assert(sizeof(Meta) + sizeof(Functor) + 16 <= kMaxKernelArgBytes,
                "multi_tensor_apply: kernel arguments exceed 4 KiB");
  TORCH_CHECK(chunk_size > 0 && chunk_size % 16 == 0 && chunk_size <= kMaxChunkSize,
              "multi_tensor_apply: bad chunk size ", chunk_size);
  TORCH_CHECK(block_size > 0 && block_size <= kBlockSize && block_size % 32 == 0,
              "multi_tensor_apply: bad block size ", block_size);
  TORCH_CHECK(tensors.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "multi_tensor_apply: too many tensors (", tensors.size(), ")");

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Meta meta{};
  meta.chunk_size = chunk_size;
  meta.block_offset = 0;
  int slots = 0;   // slots filled in this launch
  int blocks = 0;  // blocks queued in this launch

  auto launch = [&] {
    multi_tensor_kernel<DEPTH, Extra, Functor><<<blocks, block_size, 0, stream>>>(meta, functor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    meta.block_offset += blocks;
    blocks = 0;
  };

  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t numel = tensors[t].numel;
    if (numel == 0) continue;
    const int64_t chunks = (numel + chunk_size - 1) / chunk_size;
    TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(),
                "multi_tensor_apply: tensor ", t, " has too many elements (", numel, ")");
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][slots] = tensors[t].ptrs[d];
    if constexpr (!std::is_empty_v<Extra>) meta.extra[slots] = tensors[t].extra;
    meta.numel[slots] = numel;
    meta.tensor_index[slots] = static_cast<int32_t>(t);
    ++slots;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      meta.block_slot[blocks] = static_cast<uint8_t>(slots - 1);
      meta.block_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool last_chunk = chunk == chunks - 1;
      if (blocks == kMaxBlocksPerLaunch || (last_chunk && slots == Meta::kMaxTensors)) {
        launch();
        if (last_chunk) {
          slots = 0;
        } else {
          // The tensor goes on in the next launch, from slot 0.
          for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][slots - 1];
          if constexpr (!std::is_empty_v<Extra>) meta.extra[0] = meta.extra[slots - 1];
          meta.numel[0] = meta.numel[slots - 1];
          meta.tensor_index[0] = meta.tensor_index[slots - 1];
          slots = 1;
        }
      }
    }
  }
  if (blocks > 0) launch();
}

// ---------------------------------------------------------------------------
// Element access for functors.

// 16 bytes of one dtype: one load or store instruction.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ bool is_aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Visits every element of one chunk of N arrays of scalar_t (pointers already
// at the chunk's first element; n elements each). op gets the N elements of
// one index, converted to the math type (float for half and bfloat16), by
// reference, and that index (within the chunk); the arrays whose bit is set in
// WRITE_MASK are stored back.
//
// When all N pointers are 16-byte aligned, each thread moves whole 16-byte
// vectors and only the last n % W elements go one by one; otherwise the whole
// chunk goes one by one (a misaligned view, say). Every thread visits its
// elements in a fixed order, so a reduction done in op is deterministic.
template <typename scalar_t, int N, unsigned WRITE_MASK, typename Op>
__device__ __forceinline__ void chunk_foreach(scalar_t* const (&ptr)[N], int n, const Op& op) {
  static_assert(N <= 32, "WRITE_MASK has one bit per array");
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int W = Vec16<scalar_t>::kSize;
  bool aligned = true;
#pragma unroll
  for (int d = 0; d < N; ++d) aligned = aligned && is_aligned16(ptr[d]);
  const int n_vec = aligned ? n - n % W : 0;

  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  for (int i = tid * W; i < n_vec; i += threads * W) {
    Vec16<scalar_t> pack[N];
#pragma unroll
    for (int d = 0; d < N; ++d) pack[d] = *reinterpret_cast<const Vec16<scalar_t>*>(ptr[d] + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      opmath_t x[N];
#pragma unroll
      for (int d = 0; d < N; ++d) x[d] = static_cast<opmath_t>(pack[d].v[k]);
      op(x, i + k);
#pragma unroll
      for (int d = 0; d < N; ++d) {
        if ((WRITE_MASK >> d) & 1u) pack[d].v[k] = static_cast<scalar_t>(x[d]);
      }
    }
#pragma unroll
    for (int d = 0; d < N; ++d) {
      if ((WRITE_MASK >> d) & 1u) *reinterpret_cast<Vec16<scalar_t>*>(ptr[d] + i) = pack[d];
    }
  }

  for (int i = n_vec + tid; i < n; i += threads) {
    opmath_t x[N];
#pragma unroll
    for (int d = 0; d < N; ++d) x[d] = static_cast<opmath_t>(ptr[d][i]);
    op(x, i);
#pragma unroll
    for (int d = 0; d < N; ++d) {
      if ((WRITE_MASK >> d) & 1u) ptr[d][i] = static_cast<scalar_t>(x[d]);
    }
  }
}

}  // namespace fusedclip::cuda
