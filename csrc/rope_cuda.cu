// CUDA rotary embedding: a memory-bound kernel. Each element of q and k is read once and
// written once with 16-byte accesses; one thread block owns a small range of tokens
// (never a grid sized max_seqlen x documents), first puts those tokens' cos/sin rows in
// shared memory (read from the table, or computed from positions * inv_freq), then
// rotates every head of q and k of those tokens.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda_utils.cuh"
#include "rope.h"

namespace seqpar {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kDefaultSmem = 48 * 1024;  // dynamic shared memory per block without opt-in

struct RopeArgs {
  const void* q; const void* k; void* qo; void* ko;
  int64_t S, ntok, Hq, Hk, D, R;
  int64_t q_b, q_s, q_h, k_b, k_s, k_h;      // input strides (elements)
  int64_t qo_b, qo_s, qo_h, ko_b, ko_s, ko_h;  // output strides
  const float* cos; const float* sin; int64_t tab_bs;           // table mode, [b|1, s, R]
  const int64_t* pos; int64_t pos_bs; const float* inv_freq; float scaling;  // position mode
  int tok_per_block;
  bool backward;
};

template <typename T, int V, bool FROM_POS>
__global__ void rope_kernel(RopeArgs a) {
  extern __shared__ float tab[];  // cos rows then sin rows, [tok_per_block, R] each
  const int R = static_cast<int>(a.R), half = R / 2;
  float* cs = tab;
  float* sn = tab + a.tok_per_block * R;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * a.tok_per_block;
  const int ntok = static_cast<int>(min(static_cast<int64_t>(a.tok_per_block), a.ntok - tok0));

  for (int e = threadIdx.x; e < ntok * R; e += blockDim.x) {
    const int t = e / R, i = e % R;
    const int64_t g = tok0 + t, b = g / a.S, s = g % a.S;
    if (FROM_POS) {
      // float32 angle, as transformers computes position_ids.float() * inv_freq.
      const float ang = static_cast<float>(a.pos[b * a.pos_bs + s]) * a.inv_freq[i % half];
      float sv, cv;
      sincosf(ang, &sv, &cv);
      cs[e] = cv * a.scaling;
      sn[e] = sv * a.scaling;
    } else {
      cs[e] = a.cos[b * a.tab_bs + s * R + i];
      sn[e] = a.sin[b * a.tab_bs + s * R + i];
    }
  }
  __syncthreads();

  const int chunks = half / V, H = static_cast<int>(a.Hq + a.Hk);
  const int items = ntok * H * chunks;
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int c = e % chunks, h = (e / chunks) % H, t = e / (chunks * H);
    const int64_t g = tok0 + t, b = g / a.S, s = g % a.S;
    const bool is_q = h < a.Hq;
    const int hh = is_q ? h : h - static_cast<int>(a.Hq);
    const T* x = static_cast<const T*>(is_q ? a.q : a.k) +
                 (is_q ? b * a.q_b + s * a.q_s + hh * a.q_h : b * a.k_b + s * a.k_s + hh * a.k_h);
    T* y = static_cast<T*>(is_q ? a.qo : a.ko) +
           (is_q ? b * a.qo_b + s * a.qo_s + hh * a.qo_h : b * a.ko_b + s * a.ko_s + hh * a.ko_h);
    const int i0 = c * V;
    Pack<T, V> lo = *reinterpret_cast<const Pack<T, V>*>(x + i0);
    Pack<T, V> hi = *reinterpret_cast<const Pack<T, V>*>(x + i0 + half);
    const float* cr = cs + t * R;
    const float* sr = sn + t * R;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int i = i0 + v;
      const float x1 = to_float(lo.v[v]), x2 = to_float(hi.v[v]);
      float y1, y2;
      if (!a.backward) {
        y1 = x1 * cr[i] - x2 * sr[i];
        y2 = x2 * cr[i + half] + x1 * sr[i + half];
      } else {  // transpose of the rotation (rotation by -sin)
        y1 = x1 * cr[i] + x2 * sr[i + half];
        y2 = x2 * cr[i + half] - x1 * sr[i];
      }
      lo.v[v] = from_float<T>(y1);
      hi.v[v] = from_float<T>(y2);
    }
    *reinterpret_cast<Pack<T, V>*>(y + i0) = lo;
    *reinterpret_cast<Pack<T, V>*>(y + i0 + half) = hi;
  }

  if (R < a.D && a.qo != a.q) {  // dims past the rotary part pass through (out of place)
    const int rest = static_cast<int>(a.D) - R;
    for (int e = threadIdx.x; e < ntok * H * rest; e += blockDim.x) {
      const int i = R + e % rest, h = (e / rest) % H, t = e / (rest * H);
      const int64_t g = tok0 + t, b = g / a.S, s = g % a.S;
      const bool is_q = h < a.Hq;
      const int hh = is_q ? h : h - static_cast<int>(a.Hq);
      const T* x = static_cast<const T*>(is_q ? a.q : a.k) +
                   (is_q ? b * a.q_b + s * a.q_s + hh * a.q_h : b * a.k_b + s * a.k_s + hh * a.k_h);
      T* y = static_cast<T*>(is_q ? a.qo : a.ko) +
             (is_q ? b * a.qo_b + s * a.qo_s + hh * a.qo_h : b * a.ko_b + s * a.ko_s + hh * a.ko_h);
      y[i] = x[i];
    }
  }
}

bool vector_ok(const at::Tensor& t, int64_t V, int64_t half) {
  return aligned16(t.data_ptr()) && half % V == 0 && t.stride(0) % V == 0 && t.stride(1) % V == 0 &&
         t.stride(2) % V == 0;
}

template <typename T, bool FROM_POS>
void launch(RopeArgs a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo, const at::Tensor& ko) {
  constexpr int V = 16 / sizeof(T);
  const int64_t half = a.R / 2;
  const bool vec = vector_ok(q, V, half) && vector_ok(k, V, half) && vector_ok(qo, V, half) && vector_ok(ko, V, half);
  const int64_t per_tok = (a.Hq + a.Hk) * std::max<int64_t>(1, vec ? half / V : half);
  // Each token's cos and sin rows live in shared memory; launches stay under the 48 KB a
  // block gets without opting in (rotary dim 512 x 16 tokens would ask for 64 KB).
  const int64_t tab_bytes = 2 * static_cast<int64_t>(sizeof(float)) * a.R;
  TORCH_CHECK(tab_bytes <= kDefaultSmem, "seqpar: CUDA rope supports rotary dims up to ",
              kDefaultSmem / (2 * sizeof(float)), "; got ", a.R, ".");
  const int64_t fit = kDefaultSmem / std::max<int64_t>(1, tab_bytes);
  a.tok_per_block = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({16, 4 * kThreads / per_tok, fit})));
  const int64_t blocks = (a.ntok + a.tok_per_block - 1) / a.tok_per_block;
  if (blocks == 0) return;
  const size_t smem = static_cast<size_t>(tab_bytes) * a.tok_per_block;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec)
    rope_kernel<T, V, FROM_POS><<<blocks, kThreads, smem, stream>>>(a);
  else
    rope_kernel<T, 1, FROM_POS><<<blocks, kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

RopeArgs base_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo, const at::Tensor& ko,
                   int64_t R, bool backward) {
  RopeArgs a{};
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.qo = qo.data_ptr(); a.ko = ko.data_ptr();
  a.S = q.size(1); a.ntok = q.size(0) * q.size(1); a.Hq = q.size(2); a.Hk = k.size(2); a.D = q.size(3); a.R = R;
  a.q_b = q.stride(0); a.q_s = q.stride(1); a.q_h = q.stride(2);
  a.k_b = k.stride(0); a.k_s = k.stride(1); a.k_h = k.stride(2);
  a.qo_b = qo.stride(0); a.qo_s = qo.stride(1); a.qo_h = qo.stride(2);
  a.ko_b = ko.stride(0); a.ko_s = ko.stride(1); a.ko_h = ko.stride(2);
  a.backward = backward;
  return a;
}

void check_cuda_rope(const at::Tensor& q, const at::Tensor& k) {
  check_rope_qk(q, k);
  auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "seqpar: CUDA rope supports float32, bfloat16 and float16; got ", t, ".");
  TORCH_CHECK(q.size(3) <= 1 || (q.stride(3) == 1 && k.stride(3) == 1),
              "seqpar: rope needs head_dim contiguous (stride 1); call .contiguous().");
}

// float32 / bfloat16 / float16 only (check_cuda_rope rejected the rest).
#define SEQPAR_ROPE_DISPATCH(TYPE, FROM_POS, ...)                                         \
  switch (TYPE) {                                                                        \
    case at::kBFloat16: launch<__nv_bfloat16, FROM_POS>(__VA_ARGS__); break;             \
    case at::kHalf: launch<__half, FROM_POS>(__VA_ARGS__); break;                        \
    default: launch<float, FROM_POS>(__VA_ARGS__); break;                                \
  }

void rope_table_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo, const at::Tensor& ko,
                     const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  auto [c, s, bs] = rope_tables(q, cos, sin);
  RopeArgs a = base_args(q, k, qo, ko, c.size(-1), backward);
  a.cos = c.data_ptr<float>(); a.sin = s.data_ptr<float>(); a.tab_bs = bs;
  SEQPAR_ROPE_DISPATCH(q.scalar_type(), false, a, q, k, qo, ko);
}

void rope_pos_cuda_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo, const at::Tensor& ko,
                        const at::Tensor& positions, const at::Tensor& inv_freq, double scaling, bool backward) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  auto [p, f, bs] = rope_positions(q, positions, inv_freq);
  RopeArgs a = base_args(q, k, qo, ko, 2 * f.size(0), backward);
  a.pos = p.data_ptr<int64_t>(); a.pos_bs = bs; a.inv_freq = f.data_ptr<float>();
  a.scaling = static_cast<float>(scaling);
  SEQPAR_ROPE_DISPATCH(q.scalar_type(), true, a, q, k, qo, ko);
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                                             const at::Tensor& sin, bool backward) {
  auto q = q_in.contiguous(), k = k_in.contiguous();
  check_cuda_rope(q, k);
  auto qo = at::empty_like(q), ko = at::empty_like(k);
  rope_table_cuda(q, k, qo, ko, cos, sin, backward);
  return {qo, ko};
}

void rope_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check_cuda_rope(q, k);
  rope_table_cuda(q, k, q, k, cos, sin, backward);
}

std::tuple<at::Tensor, at::Tensor> rope_pos_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& positions, const at::Tensor& inv_freq,
                                                 double scaling, bool backward) {
  auto q = q_in.contiguous(), k = k_in.contiguous();
  check_cuda_rope(q, k);
  auto qo = at::empty_like(q), ko = at::empty_like(k);
  rope_pos_cuda_impl(q, k, qo, ko, positions, inv_freq, scaling, backward);
  return {qo, ko};
}

void rope_pos_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& inv_freq,
                           double scaling, bool backward) {
  check_cuda_rope(q, k);
  rope_pos_cuda_impl(q, k, q, k, positions, inv_freq, scaling, backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(seqpar, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("rope_", &rope_inplace_cuda);
  m.impl("rope_pos", &rope_pos_cuda);
  m.impl("rope_pos_", &rope_pos_inplace_cuda);
}

}  // namespace seqpar
