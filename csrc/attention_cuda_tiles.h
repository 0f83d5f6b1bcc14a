// Tile shapes and shared-memory footprint of the CUDA attention kernels (attention_cuda.cu).
// Plain C++ so the CPU build reports the footprint too (ops.cpp registers
// seqpar::attention_cuda_smem_bytes): Python compares it with the GPU's opt-in limit
// before choosing this kernel (sm_86/sm_89 allow 101,376 bytes, less than head_dim 128
// needs), and the .cu checks it again before launching.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace seqpar {

constexpr int kBQ = 64, kBK = 64;  // query rows and key columns per tile

// Shared-memory leading dims, padded against bank conflicts while keeping every 16-row
// fragment start 32-byte aligned (WMMA's requirement).
template <int D> struct Ld {
  static constexpr int T = D + 8;      // bf16/fp16 [rows][D] tiles
  static constexpr int S = kBK + 4;    // float score rows
  static constexpr int P = kBK + 8;    // bf16/fp16 probability rows
  static constexpr int O = D + 4;      // float output accumulator rows
};

// Q, K, V, P tiles; scores, output accumulator, row max/sum; query and key positions/doc ids.
template <int D> constexpr size_t fwd_smem() {
  return sizeof(uint16_t) * (3 * 64 * Ld<D>::T + kBQ * Ld<D>::P) +
         sizeof(float) * (kBQ * Ld<D>::S + kBQ * Ld<D>::O + 2 * kBQ) + sizeof(int64_t) * (2 * kBQ + 2 * kBK);
}

// K, V, Q, dO, P, dS tiles; S, dP; lse, delta; positions/doc ids (BwdSmem::carve's layout).
template <int D> constexpr size_t bwd_smem() {
  return sizeof(uint16_t) * (4 * 64 * Ld<D>::T + 2 * 64 * Ld<D>::P) + sizeof(float) * (2 * 64 * Ld<D>::S + 2 * 64) +
         sizeof(int64_t) * (4 * 64);
}

// Bytes per block the forward and backward kernels need for `head_dim` (the larger of
// the two: a block the forward serves must be served backward too); 0 for head dims
// without a CUDA kernel.
inline int64_t attention_cuda_smem_bytes(int64_t head_dim) {
  switch (head_dim) {
    case 64: return static_cast<int64_t>(std::max(fwd_smem<64>(), bwd_smem<64>()));
    case 80: return static_cast<int64_t>(std::max(fwd_smem<80>(), bwd_smem<80>()));
    case 128: return static_cast<int64_t>(std::max(fwd_smem<128>(), bwd_smem<128>()));
    default: return 0;
  }
}

}  // namespace seqpar
