// CUDA block attention on tensor cores (WMMA 16x16x16, bf16/fp16 in, float32 accumulate).
//
// Forward: one thread block (4 warps) per (batch, head, 64 query rows). Q, K and V tiles
// live in shared memory; each warp owns 16 query rows, computes S = Q K^T with WMMA,
// does the online-softmax update in float32 (scores never leave shared memory) and
// accumulates O += P V. Key tiles no query of the block may see (beyond the causal
// diagonal, or in another packed document) are skipped.
// Backward (recompute from the final lse, as flash-attention): one kernel per key tile
// accumulates dK/dV in registers over every query head of its GQA group; one kernel per
// query tile accumulates dQ. No atomics, so results are deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <mma.h>
#include <torch/library.h>

#include <cmath>

#include "attention_cuda_tiles.h"
#include "common.h"
#include "cuda_utils.cuh"

namespace seqpar {
namespace {

using namespace nvcuda;

constexpr int kWarps = 4, kThreads = kWarps * 32;  // tile shapes: attention_cuda_tiles.h
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

template <typename T> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

struct AttnArgs {
  const void* q; const void* k; const void* v;
  const void* dout; const float* lse; const float* delta;
  void* out; float* lse_out; float* dq; float* dk; float* dv;
  int64_t B, Sq, Sk, Hq, Hk;
  float scale;
  MaskView m;
};

// rows x D tile (row stride `rs` elements) into shared memory with 16-byte accesses;
// rows past `rows` are zero so padded keys/values never inject NaN.
template <typename T, int D>
__device__ void load_tile(T* dst, const T* src, int rows, int64_t rs) {
  constexpr int V = 16 / sizeof(T), CPR = D / V;
  for (int e = threadIdx.x; e < 64 * CPR; e += kThreads) {
    const int r = e / CPR, c = (e % CPR) * V;
    Pack<T, V> p;
    if (r < rows) {
      p = *reinterpret_cast<const Pack<T, V>*>(src + r * rs + c);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) p.v[v] = from_float<T>(0.f);
    }
    *reinterpret_cast<Pack<T, V>*>(dst + r * Ld<D>::T + c) = p;
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ bool allowed(const MaskView& m, int64_t qp, int64_t qd, int64_t kp, int64_t kd) {
  return (!m.causal || kp <= qp) && (!m.qdoc || kd == qd);
}

// Writes a warp's 16 x D float accumulators to global rows [row0, row0 + 16) (ld = `ld`),
// guarding rows >= `rows` through a 16 x 16 shared scratch.
template <int D>
__device__ void store_rows(FragC (&acc)[D / 16], float* dst, int64_t ld, int row0, int rows, float* scratch) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    if (row0 + 16 <= rows) {
      wmma::store_matrix_sync(dst + row0 * ld + n * 16, acc[n], ld, wmma::mem_row_major);
    } else {
      wmma::store_matrix_sync(scratch, acc[n], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = e / 16, c = e % 16;
        if (row0 + r < rows) dst[(row0 + r) * ld + n * 16 + c] = scratch[e];
      }
      __syncwarp();
    }
  }
}

// ------------------------------------------------------------------------- forward

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(AttnArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  using L = Ld<D>;
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBQ * L::T;
  T* sV = sK + kBK * L::T;
  T* sP = sV + kBK * L::T;
  float* sS = reinterpret_cast<float*>(sP + kBQ * L::P);
  float* sO = sS + kBQ * L::S;
  float* sM = sO + kBQ * L::O;
  float* sL = sM + kBQ;
  int64_t* sQpos = reinterpret_cast<int64_t*>(sL + kBQ);
  int64_t* sQdoc = sQpos + kBQ;
  int64_t* sKpos = sQdoc + kBQ;
  int64_t* sKdoc = sKpos + kBK;

  const MaskView& m = a.m;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r0 = warp * 16;
  const int64_t nqt = (a.Sq + kBQ - 1) / kBQ;
  const int64_t qt = nqt - 1 - blockIdx.x;  // longest causal tiles start first
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, hk = h / (a.Hq / a.Hk);
  const int64_t i0 = qt * kBQ;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kBQ), a.Sq - i0));
  const float sl2 = a.scale * kLog2e;  // scores in log2 units: exp2 is one instruction

  load_tile<T, D>(sQ, static_cast<const T*>(a.q) + ((b * a.Sq + i0) * a.Hq + h) * D, rows, a.Hq * D);
  for (int e = tid; e < kBQ * L::O; e += kThreads) sO[e] = 0.f;
  for (int i = tid; i < kBQ; i += kThreads) {
    sM[i] = kNegInf;
    sL[i] = 0.f;
    sQpos[i] = i < rows ? q_pos(m, b, i0 + i) : INT64_MIN;
    sQdoc[i] = i < rows ? q_doc(m, b, i0 + i) : 0;
  }
  __syncthreads();
  int64_t qpos_hi = INT64_MIN, qdoc_lo = INT64_MAX, qdoc_hi = INT64_MIN;
  for (int i = 0; i < rows; ++i) {
    qpos_hi = max(qpos_hi, sQpos[i]);
    qdoc_lo = min(qdoc_lo, sQdoc[i]);
    qdoc_hi = max(qdoc_hi, sQdoc[i]);
  }
  FragA<T> fq[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(fq[kk], sQ + r0 * L::T + kk * 16, L::T);

  for (int64_t j0 = 0; j0 < a.Sk; j0 += kBK) {
    const int cols = static_cast<int>(min(static_cast<int64_t>(kBK), a.Sk - j0));
    __syncthreads();  // every warp is done with the previous K/V tile
    if (tid < kBK) {
      sKpos[tid] = tid < cols ? k_pos(m, b, j0 + tid) : INT64_MAX;
      sKdoc[tid] = tid < cols ? k_doc(m, b, j0 + tid) : 0;
    }
    const bool vis = tid < cols && (!m.causal || k_pos(m, b, j0 + tid) <= qpos_hi) &&
                     (!m.qdoc || (k_doc(m, b, j0 + tid) >= qdoc_lo && k_doc(m, b, j0 + tid) <= qdoc_hi));
    if (!__syncthreads_or(vis)) continue;  // no query of this block sees this key tile
    const int64_t koff = ((b * a.Sk + j0) * a.Hk + hk) * D;
    load_tile<T, D>(sK, static_cast<const T*>(a.k) + koff, cols, a.Hk * D);
    load_tile<T, D>(sV, static_cast<const T*>(a.v) + koff, cols, a.Hk * D);
    __syncthreads();

#pragma unroll
    for (int n = 0; n < kBK / 16; ++n) {  // S = Q K^T for this warp's 16 rows
      FragC acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragBCol<T> fk;
        wmma::load_matrix_sync(fk, sK + n * 16 * L::T + kk * 16, L::T);
        wmma::mma_sync(acc, fq[kk], fk, acc);
      }
      wmma::store_matrix_sync(sS + r0 * L::S + n * 16, acc, L::S, wmma::mem_row_major);
    }
    __syncwarp();

    for (int rr = 0; rr < 16; ++rr) {  // online softmax, one row at a time, 2 keys per lane
      const int i = r0 + rr;
      const float* srow = sS + i * L::S;
      const int64_t qp = sQpos[i], qd = sQdoc[i];
      float s[2];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int c = lane + 32 * t;
        s[t] = (c < cols && allowed(m, qp, qd, sKpos[c], sKdoc[c])) ? srow[c] * sl2 : kNegInf;
      }
      const float mt = warp_max(fmaxf(s[0], s[1]));
      const float m_old = sM[i];
      float alpha = 1.f, p0 = 0.f, p1 = 0.f, m_new = m_old;
      if (mt != kNegInf) {
        m_new = fmaxf(m_old, mt);
        alpha = exp2f(m_old - m_new);  // 0 on the first visible tile
        p0 = exp2f(s[0] - m_new);
        p1 = exp2f(s[1] - m_new);
      }
      const float psum = warp_sum(p0 + p1);
      sP[i * L::P + lane] = from_float<T>(p0);
      sP[i * L::P + lane + 32] = from_float<T>(p1);
      for (int c = lane; c < D; c += 32) sO[i * L::O + c] *= alpha;
      __syncwarp();
      if (lane == 0) {
        sL[i] = sL[i] * alpha + psum;
        sM[i] = m_new;
      }
    }
    __syncwarp();

#pragma unroll
    for (int n = 0; n < D / 16; ++n) {  // O += P V
      FragC acc;
      wmma::load_matrix_sync(acc, sO + r0 * L::O + n * 16, L::O, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        FragA<T> fp;
        FragBRow<T> fv;
        wmma::load_matrix_sync(fp, sP + r0 * L::P + kk * 16, L::P);
        wmma::load_matrix_sync(fv, sV + kk * 16 * L::T + n * 16, L::T);
        wmma::mma_sync(acc, fp, fv, acc);
      }
      wmma::store_matrix_sync(sO + r0 * L::O + n * 16, acc, L::O, wmma::mem_row_major);
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(a.out);
  for (int e = tid; e < rows * D; e += kThreads) {
    const int i = e / D, c = e % D;
    const float l = sL[i];
    out[((b * a.Sq + i0 + i) * a.Hq + h) * D + c] = from_float<T>(l > 0.f ? sO[i * L::O + c] / l : 0.f);
  }
  for (int i = tid; i < rows; i += kThreads) {  // fully masked row: out 0, lse -inf
    const float l = sL[i];
    a.lse_out[(b * a.Hq + h) * a.Sq + i0 + i] = l > 0.f ? (sM[i] + log2f(l)) * kLn2 : kNegInf;
  }
}

// ------------------------------------------------------------------------- backward

struct BwdSmem {
  template <typename T, int D>
  __device__ static void carve(unsigned char* smem, T*& t0, T*& t1, T*& t2, T*& t3, T*& sP, T*& sdS, float*& sS,
                               float*& sdP, float*& sLse, float*& sDelta, int64_t*& sQpos, int64_t*& sQdoc,
                               int64_t*& sKpos, int64_t*& sKdoc) {
    using L = Ld<D>;
    t0 = reinterpret_cast<T*>(smem);
    t1 = t0 + 64 * L::T;
    t2 = t1 + 64 * L::T;
    t3 = t2 + 64 * L::T;
    sP = t3 + 64 * L::T;
    sdS = sP + 64 * L::P;
    sS = reinterpret_cast<float*>(sdS + 64 * L::P);
    sdP = sS + 64 * L::S;
    sLse = sdP + 64 * L::S;
    sDelta = sLse + 64;
    sQpos = reinterpret_cast<int64_t*>(sDelta + 64);
    sQdoc = sQpos + 64;
    sKpos = sQdoc + 64;
    sKdoc = sKpos + 64;
  }
};

// Loads lse (log2 units, -inf for padding rows), delta and the mask indices of a query tile.
__device__ void load_query_stats(const AttnArgs& a, int64_t b, int64_t h, int64_t i0, int rows, float* sLse,
                                 float* sDelta, int64_t* sQpos, int64_t* sQdoc) {
  for (int i = threadIdx.x; i < 64; i += kThreads) {
    const int64_t r = (b * a.Hq + h) * a.Sq + i0 + i;
    sLse[i] = i < rows ? a.lse[r] * kLog2e : kNegInf;
    sDelta[i] = i < rows ? a.delta[r] : 0.f;
    sQpos[i] = i < rows ? q_pos(a.m, b, i0 + i) : INT64_MIN;
    sQdoc[i] = i < rows ? q_doc(a.m, b, i0 + i) : 0;
  }
}

// dK, dV: one block per (batch, kv head, 64 keys); each warp owns 16 keys.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(AttnArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  using L = Ld<D>;
  T *sK, *sV, *sQ, *sdO, *sP, *sdS;
  float *sS, *sdP, *sLse, *sDelta;
  int64_t *sQpos, *sQdoc, *sKpos, *sKdoc;
  BwdSmem::carve<T, D>(smem, sK, sV, sQ, sdO, sP, sdS, sS, sdP, sLse, sDelta, sQpos, sQdoc, sKpos, sKdoc);

  const MaskView& m = a.m;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r0 = warp * 16;
  const int64_t b = blockIdx.y / a.Hk, hk = blockIdx.y % a.Hk, G = a.Hq / a.Hk;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBK;
  const int cols = static_cast<int>(min(static_cast<int64_t>(kBK), a.Sk - j0));
  const float sl2 = a.scale * kLog2e;

  const int64_t koff = ((b * a.Sk + j0) * a.Hk + hk) * D;
  load_tile<T, D>(sK, static_cast<const T*>(a.k) + koff, cols, a.Hk * D);
  load_tile<T, D>(sV, static_cast<const T*>(a.v) + koff, cols, a.Hk * D);
  for (int j = tid; j < kBK; j += kThreads) {
    sKpos[j] = j < cols ? k_pos(m, b, j0 + j) : INT64_MAX;
    sKdoc[j] = j < cols ? k_doc(m, b, j0 + j) : 0;
  }
  __syncthreads();
  int64_t kpos_lo = INT64_MAX, kdoc_lo = INT64_MAX, kdoc_hi = INT64_MIN;
  for (int j = 0; j < cols; ++j) {
    kpos_lo = min(kpos_lo, sKpos[j]);
    kdoc_lo = min(kdoc_lo, sKdoc[j]);
    kdoc_hi = max(kdoc_hi, sKdoc[j]);
  }

  FragC dk[D / 16], dv[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(dk[n], 0.f);
    wmma::fill_fragment(dv[n], 0.f);
  }

  for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
    for (int64_t i0 = 0; i0 < a.Sq; i0 += kBQ) {
      const int rows = static_cast<int>(min(static_cast<int64_t>(kBQ), a.Sq - i0));
      __syncthreads();  // previous query tile fully consumed
      load_query_stats(a, b, h, i0, rows, sLse, sDelta, sQpos, sQdoc);
      const int64_t qp = tid < rows ? q_pos(m, b, i0 + tid) : INT64_MIN;
      const int64_t qd = tid < rows ? q_doc(m, b, i0 + tid) : 0;
      const bool vis = tid < rows && (!m.causal || qp >= kpos_lo) && (!m.qdoc || (qd >= kdoc_lo && qd <= kdoc_hi));
      if (!__syncthreads_or(vis)) continue;
      const int64_t qoff = ((b * a.Sq + i0) * a.Hq + h) * D;
      load_tile<T, D>(sQ, static_cast<const T*>(a.q) + qoff, rows, a.Hq * D);
      load_tile<T, D>(sdO, static_cast<const T*>(a.dout) + qoff, rows, a.Hq * D);
      __syncthreads();

#pragma unroll
      for (int n = 0; n < kBQ / 16; ++n) {  // S^T = K Q^T and dP^T = V dO^T, 16 keys x 64 queries
        FragC s, dp;
        wmma::fill_fragment(s, 0.f);
        wmma::fill_fragment(dp, 0.f);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          FragA<T> fk, fv;
          FragBCol<T> fq, fdo;
          wmma::load_matrix_sync(fk, sK + r0 * L::T + kk * 16, L::T);
          wmma::load_matrix_sync(fq, sQ + n * 16 * L::T + kk * 16, L::T);
          wmma::mma_sync(s, fk, fq, s);
          wmma::load_matrix_sync(fv, sV + r0 * L::T + kk * 16, L::T);
          wmma::load_matrix_sync(fdo, sdO + n * 16 * L::T + kk * 16, L::T);
          wmma::mma_sync(dp, fv, fdo, dp);
        }
        wmma::store_matrix_sync(sS + r0 * L::S + n * 16, s, L::S, wmma::mem_row_major);
        wmma::store_matrix_sync(sdP + r0 * L::S + n * 16, dp, L::S, wmma::mem_row_major);
      }
      __syncwarp();
      for (int rr = 0; rr < 16; ++rr) {  // P^T and dS^T = P^T (dP^T - delta) scale
        const int j = r0 + rr;
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          const int i = lane + 32 * t;
          const bool ok = sLse[i] != kNegInf && allowed(m, sQpos[i], sQdoc[i], sKpos[j], sKdoc[j]);
          const float p = ok ? exp2f(sS[j * L::S + i] * sl2 - sLse[i]) : 0.f;
          sP[j * L::P + i] = from_float<T>(p);
          sdS[j * L::P + i] = from_float<T>(p * (sdP[j * L::S + i] - sDelta[i]) * a.scale);
        }
      }
      __syncwarp();
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {  // dV += P^T dO, dK += dS^T Q
#pragma unroll
        for (int kk = 0; kk < kBQ / 16; ++kk) {
          FragA<T> fp, fds;
          FragBRow<T> fdo, fq;
          wmma::load_matrix_sync(fp, sP + r0 * L::P + kk * 16, L::P);
          wmma::load_matrix_sync(fdo, sdO + kk * 16 * L::T + n * 16, L::T);
          wmma::mma_sync(dv[n], fp, fdo, dv[n]);
          wmma::load_matrix_sync(fds, sdS + r0 * L::P + kk * 16, L::P);
          wmma::load_matrix_sync(fq, sQ + kk * 16 * L::T + n * 16, L::T);
          wmma::mma_sync(dk[n], fds, fq, dk[n]);
        }
      }
    }
  }
  __syncthreads();
  float* scratch = sS + warp * 256;  // 16 x 16 per warp, free now
  const int64_t ld = a.Hk * D;
  store_rows<D>(dk, a.dk + ((b * a.Sk + j0) * a.Hk + hk) * D, ld, r0, cols, scratch);
  store_rows<D>(dv, a.dv + ((b * a.Sk + j0) * a.Hk + hk) * D, ld, r0, cols, scratch);
}

// dQ: one block per (batch, query head, 64 queries); each warp owns 16 queries.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(AttnArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  using L = Ld<D>;
  T *sQ, *sdO, *sK, *sV, *sP, *sdS;
  float *sS, *sdP, *sLse, *sDelta;
  int64_t *sQpos, *sQdoc, *sKpos, *sKdoc;
  BwdSmem::carve<T, D>(smem, sQ, sdO, sK, sV, sP, sdS, sS, sdP, sLse, sDelta, sQpos, sQdoc, sKpos, sKdoc);

  const MaskView& m = a.m;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r0 = warp * 16;
  const int64_t nqt = (a.Sq + kBQ - 1) / kBQ;
  const int64_t qt = nqt - 1 - blockIdx.x;
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, hk = h / (a.Hq / a.Hk);
  const int64_t i0 = qt * kBQ;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kBQ), a.Sq - i0));
  const float sl2 = a.scale * kLog2e;

  const int64_t qoff = ((b * a.Sq + i0) * a.Hq + h) * D;
  load_tile<T, D>(sQ, static_cast<const T*>(a.q) + qoff, rows, a.Hq * D);
  load_tile<T, D>(sdO, static_cast<const T*>(a.dout) + qoff, rows, a.Hq * D);
  load_query_stats(a, b, h, i0, rows, sLse, sDelta, sQpos, sQdoc);
  __syncthreads();
  int64_t qpos_hi = INT64_MIN, qdoc_lo = INT64_MAX, qdoc_hi = INT64_MIN;
  for (int i = 0; i < rows; ++i) {
    qpos_hi = max(qpos_hi, sQpos[i]);
    qdoc_lo = min(qdoc_lo, sQdoc[i]);
    qdoc_hi = max(qdoc_hi, sQdoc[i]);
  }

  FragC dq[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dq[n], 0.f);

  for (int64_t j0 = 0; j0 < a.Sk; j0 += kBK) {
    const int cols = static_cast<int>(min(static_cast<int64_t>(kBK), a.Sk - j0));
    __syncthreads();
    if (tid < kBK) {
      sKpos[tid] = tid < cols ? k_pos(m, b, j0 + tid) : INT64_MAX;
      sKdoc[tid] = tid < cols ? k_doc(m, b, j0 + tid) : 0;
    }
    const bool vis = tid < cols && (!m.causal || k_pos(m, b, j0 + tid) <= qpos_hi) &&
                     (!m.qdoc || (k_doc(m, b, j0 + tid) >= qdoc_lo && k_doc(m, b, j0 + tid) <= qdoc_hi));
    if (!__syncthreads_or(vis)) continue;
    const int64_t koff = ((b * a.Sk + j0) * a.Hk + hk) * D;
    load_tile<T, D>(sK, static_cast<const T*>(a.k) + koff, cols, a.Hk * D);
    load_tile<T, D>(sV, static_cast<const T*>(a.v) + koff, cols, a.Hk * D);
    __syncthreads();

#pragma unroll
    for (int n = 0; n < kBK / 16; ++n) {  // S = Q K^T, dP = dO V^T
      FragC s, dp;
      wmma::fill_fragment(s, 0.f);
      wmma::fill_fragment(dp, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragA<T> fq, fdo;
        FragBCol<T> fk, fv;
        wmma::load_matrix_sync(fq, sQ + r0 * L::T + kk * 16, L::T);
        wmma::load_matrix_sync(fk, sK + n * 16 * L::T + kk * 16, L::T);
        wmma::mma_sync(s, fq, fk, s);
        wmma::load_matrix_sync(fdo, sdO + r0 * L::T + kk * 16, L::T);
        wmma::load_matrix_sync(fv, sV + n * 16 * L::T + kk * 16, L::T);
        wmma::mma_sync(dp, fdo, fv, dp);
      }
      wmma::store_matrix_sync(sS + r0 * L::S + n * 16, s, L::S, wmma::mem_row_major);
      wmma::store_matrix_sync(sdP + r0 * L::S + n * 16, dp, L::S, wmma::mem_row_major);
    }
    __syncwarp();
    for (int rr = 0; rr < 16; ++rr) {
      const int i = r0 + rr;
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int j = lane + 32 * t;
        const bool ok = j < cols && sLse[i] != kNegInf && allowed(m, sQpos[i], sQdoc[i], sKpos[j], sKdoc[j]);
        const float p = ok ? exp2f(sS[i * L::S + j] * sl2 - sLse[i]) : 0.f;
        sdS[i * L::P + j] = from_float<T>(p * (sdP[i * L::S + j] - sDelta[i]) * a.scale);
      }
    }
    __syncwarp();
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {  // dQ += dS K
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        FragA<T> fds;
        FragBRow<T> fk;
        wmma::load_matrix_sync(fds, sdS + r0 * L::P + kk * 16, L::P);
        wmma::load_matrix_sync(fk, sK + kk * 16 * L::T + n * 16, L::T);
        wmma::mma_sync(dq[n], fds, fk, dq[n]);
      }
    }
  }
  __syncthreads();
  store_rows<D>(dq, a.dq + ((b * a.Sq + i0) * a.Hq + h) * D, a.Hq * D, r0, rows, sS + warp * 256);
}

// ------------------------------------------------------------------------- host side

at::Tensor aligned(const at::Tensor& t) {
  auto c = t.contiguous();
  return aligned16(c.data_ptr()) ? c : c.clone();  // 16-byte vector loads need it
}

void check_cuda_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qkv(q, k, v);
  TORCH_CHECK(q.is_cuda(), "seqpar: CUDA attention got a non-CUDA tensor.");
  auto t = q.scalar_type();
  TORCH_CHECK(t == at::kBFloat16 || t == at::kHalf,
              "seqpar: CUDA attention runs on tensor cores for bfloat16/float16 only; got ", t,
              ". seqpar.ops.attention_forward routes other dtypes to the torch path.");
  const int64_t d = q.size(3);
  TORCH_CHECK(d == 64 || d == 80 || d == 128, "seqpar: CUDA attention supports head_dim 64, 80, 128; got ", d,
              ". seqpar.ops.attention_forward routes other sizes to the torch path.");
  TORCH_CHECK(q.size(0) * q.size(2) <= 65535, "seqpar: CUDA attention needs batch * heads <= 65535.");
}

// Head dim 128 needs more shared memory than sm_86/sm_89 give a block (101,376
// bytes); refuse those before any work instead of failing the launch. Python's
// compiled.available() makes the same comparison, so dispatch never gets here with them.
void check_smem_fits(int64_t head_dim, size_t need) {
  int dev = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(need <= static_cast<size_t>(limit), "seqpar: CUDA attention with head_dim ", head_dim, " needs ", need,
              " bytes of shared memory per block; this GPU (device ", dev, ") allows ", limit,
              ". seqpar.ops.attention_forward routes such blocks to another kernel.");
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, const AttnArgs& a) {
  if (grid.x == 0 || grid.y == 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls F.template operator()<T, D>() for the tensor's dtype and head_dim.
template <typename F>
void dispatch(at::ScalarType t, int64_t d, F&& f) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    if (d == 64) f.template operator()<T, 64>();
    else if (d == 80) f.template operator()<T, 80>();
    else f.template operator()<T, 128>();
  };
  if (t == at::kBFloat16) by_dim(__nv_bfloat16{});
  else by_dim(__half{});
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal, double scale,
    const std::optional<at::Tensor>& q_positions, const std::optional<at::Tensor>& k_positions,
    const std::optional<at::Tensor>& q_doc_ids, const std::optional<at::Tensor>& k_doc_ids) {
  check_cuda_attention(q_in, k_in, v_in);
  const c10::cuda::OptionalCUDAGuard guard(q_in.device());
  auto q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), Sk = k.size(1);
  MaskArgs ma = mask_args(causal, B, Sq, Sk, q.device(), q_positions, k_positions, q_doc_ids, k_doc_ids);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  AttnArgs a{};
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr(); a.out = out.data_ptr(); a.lse_out = lse.data_ptr<float>();
  a.B = B; a.Sq = Sq; a.Sk = Sk; a.Hq = Hq; a.Hk = k.size(2); a.scale = static_cast<float>(scale);
  a.m = ma.view(Sq, Sk);
  const dim3 grid(static_cast<unsigned>((Sq + kBQ - 1) / kBQ), static_cast<unsigned>(B * Hq));
  dispatch(q.scalar_type(), q.size(3), [&]<typename T, int D>() {
    check_smem_fits(D, fwd_smem<D>());
    launch(attn_fwd_kernel<T, D>, grid, fwd_smem<D>(), a);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& delta_in, bool causal,
    double scale, const std::optional<at::Tensor>& q_positions, const std::optional<at::Tensor>& k_positions,
    const std::optional<at::Tensor>& q_doc_ids, const std::optional<at::Tensor>& k_doc_ids) {
  check_cuda_attention(q_in, k_in, v_in);
  // The kernels read lse/delta through raw pointers: a wrong shape or a host tensor would
  // be read out of bounds, not rejected.
  check_attention_bwd_args(q_in, dout_in, out_in, lse_in, delta_in);
  const c10::cuda::OptionalCUDAGuard guard(q_in.device());
  auto q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  auto dout = aligned(dout_in.to(q.scalar_type()));
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), Sk = k.size(1), Hk = k.size(2);
  auto lse = lse_in.to(at::kFloat).contiguous();
  at::Tensor delta = (delta_in.has_value() && delta_in->defined())
                         ? delta_in->to(at::kFloat).contiguous()
                         : (dout.to(at::kFloat) * out_in.to(at::kFloat)).sum(-1).transpose(1, 2).contiguous();
  MaskArgs ma = mask_args(causal, B, Sq, Sk, q.device(), q_positions, k_positions, q_doc_ids, k_doc_ids);
  auto dq = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  auto dk = at::empty(k.sizes(), k.options().dtype(at::kFloat));
  auto dv = at::empty(v.sizes(), v.options().dtype(at::kFloat));
  AttnArgs a{};
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr(); a.dout = dout.data_ptr();
  a.lse = lse.data_ptr<float>(); a.delta = delta.data_ptr<float>();
  a.dq = dq.data_ptr<float>(); a.dk = dk.data_ptr<float>(); a.dv = dv.data_ptr<float>();
  a.B = B; a.Sq = Sq; a.Sk = Sk; a.Hq = Hq; a.Hk = Hk; a.scale = static_cast<float>(scale);
  a.m = ma.view(Sq, Sk);
  const dim3 grid_kv(static_cast<unsigned>((Sk + kBK - 1) / kBK), static_cast<unsigned>(B * Hk));
  const dim3 grid_q(static_cast<unsigned>((Sq + kBQ - 1) / kBQ), static_cast<unsigned>(B * Hq));
  dispatch(q.scalar_type(), q.size(3), [&]<typename T, int D>() {
    check_smem_fits(D, bwd_smem<D>());
    launch(attn_bwd_dkdv_kernel<T, D>, grid_kv, bwd_smem<D>(), a);
    launch(attn_bwd_dq_kernel<T, D>, grid_q, bwd_smem<D>(), a);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqpar, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace seqpar
