// CPU rotary embedding (half rotation, as Llama / GPT-NeoX `rotate_half`) of q and k in
// one pass over the tokens: each token's cos/sin row is read (or computed) once and used
// for every head of q and k. Works in place or out of place; bshd with any strides whose
// last dim is contiguous.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "rope.h"

namespace seqpar {
namespace {

// y = rotate(x) for one token's heads. For i < r/2, with a = x[i], b = x[i + r/2]:
//   forward : y[i] = a c[i] - b s[i],          y[i + r/2] = b c[i + r/2] + a s[i + r/2]
//   backward: y[i] = a c[i] + b s[i + r/2],    y[i + r/2] = b c[i + r/2] - a s[i]
// (the transpose, i.e. rotation by -sin for the duplicated layout). Dims >= r pass through.
// The direction is a template parameter and the results go through small __restrict__
// buffers, so the compute loop has no branch and no possible overlap and the compiler
// vectorises it (in place, x and y are the same row: all of it is read before any write).
template <bool kBackward, typename scalar_t, typename acc_t>
void rotate_row(const scalar_t* x, scalar_t* y, int64_t half, const acc_t* __restrict__ c,
                const acc_t* __restrict__ s, acc_t* __restrict__ lo, acc_t* __restrict__ hi) {
  for (int64_t i = 0; i < half; ++i) {
    const acc_t a = static_cast<acc_t>(x[i]), b = static_cast<acc_t>(x[i + half]);
    lo[i] = kBackward ? a * c[i] + b * s[i + half] : a * c[i] - b * s[i];
    hi[i] = kBackward ? b * c[i + half] - a * s[i] : b * c[i + half] + a * s[i + half];
  }
  for (int64_t i = 0; i < half; ++i) {
    y[i] = static_cast<scalar_t>(lo[i]);
    y[i + half] = static_cast<scalar_t>(hi[i]);
  }
}

template <typename scalar_t, typename acc_t>
void rotate_heads(const scalar_t* x, scalar_t* y, int64_t H, int64_t xs, int64_t ys, int64_t D,
                  int64_t R, const acc_t* c, const acc_t* s, bool backward, acc_t* lo, acc_t* hi) {
  const int64_t half = R / 2;
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* xh = x + h * xs;
    scalar_t* yh = y + h * ys;
    if (backward) rotate_row<true>(xh, yh, half, c, s, lo, hi);
    else rotate_row<false>(xh, yh, half, c, s, lo, hi);
    if (yh != xh)
      for (int64_t i = R; i < D; ++i) yh[i] = xh[i];
  }
}

// Runs `fill(b, t, c, s)` (one token's cos/sin rows) then rotates q and k of that token.
template <typename scalar_t, typename acc_t, typename Fill>
void rope_driver(const at::Tensor& q, const at::Tensor& k, at::Tensor& qo, at::Tensor& ko, int64_t R,
                 bool backward, const Fill& fill) {
  const int64_t B = q.size(0), S = q.size(1), Hq = q.size(2), Hk = k.size(2), D = q.size(3);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  scalar_t* qop = qo.data_ptr<scalar_t>();
  scalar_t* kop = ko.data_ptr<scalar_t>();
  at::parallel_for(0, B * S, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> c(R), s(R), lo(R / 2), hi(R / 2);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / S, t = w % S;
      fill(b, t, c.data(), s.data());
      rotate_heads(qp + b * q.stride(0) + t * q.stride(1), qop + b * qo.stride(0) + t * qo.stride(1), Hq,
                   q.stride(2), qo.stride(2), D, R, c.data(), s.data(), backward, lo.data(), hi.data());
      rotate_heads(kp + b * k.stride(0) + t * k.stride(1), kop + b * ko.stride(0) + t * ko.stride(1), Hk,
                   k.stride(2), ko.stride(2), D, R, c.data(), s.data(), backward, lo.data(), hi.data());
    }
  });
}

void check_last_dim(const at::Tensor& t, bool inplace) {
  TORCH_CHECK(!inplace || t.size(3) <= 1 || t.stride(3) == 1,
              "seqpar: in-place rope needs head_dim contiguous (stride 1); call .contiguous() or use inplace=False.");
}

at::Tensor prepare(const at::Tensor& t) {
  return (t.size(3) <= 1 || t.stride(3) == 1) ? t : t.contiguous();
}

void rope_table_impl(const at::Tensor& q_in, const at::Tensor& k_in, at::Tensor& qo, at::Tensor& ko,
                     const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  auto q = prepare(q_in), k = prepare(k_in);
  auto [c, s, bs] = rope_tables(q, cos, sin);
  const int64_t R = c.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "seqpar_rope", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* cp = c.data_ptr<acc_t>();
    const acc_t* sp = s.data_ptr<acc_t>();
    rope_driver<scalar_t, acc_t>(q, k, qo, ko, R, backward, [&](int64_t b, int64_t t, acc_t* cr, acc_t* sr) {
      const int64_t off = b * bs + t * R;
      std::copy(cp + off, cp + off + R, cr);
      std::copy(sp + off, sp + off + R, sr);
    });
  });
}

void rope_pos_impl(const at::Tensor& q_in, const at::Tensor& k_in, at::Tensor& qo, at::Tensor& ko,
                   const at::Tensor& positions, const at::Tensor& inv_freq, double scaling, bool backward) {
  auto q = prepare(q_in), k = prepare(k_in);
  auto [p, f, bs] = rope_positions(q, positions, inv_freq);
  const int64_t half = f.size(0), R = 2 * half;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "seqpar_rope_pos", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* pp = p.data_ptr<int64_t>();
    const float* fp = f.data_ptr<float>();
    const acc_t sc = static_cast<acc_t>(scaling);
    rope_driver<scalar_t, acc_t>(q, k, qo, ko, R, backward, [&](int64_t b, int64_t t, acc_t* cr, acc_t* sr) {
      // float32 angle, as transformers computes position_ids.float() * inv_freq.
      const float pos = static_cast<float>(pp[b * bs + t]);
      for (int64_t i = 0; i < half; ++i) {
        const acc_t ang = static_cast<acc_t>(pos * fp[i]);
        cr[i] = cr[i + half] = std::cos(ang) * sc;
        sr[i] = sr[i + half] = std::sin(ang) * sc;
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool backward) {
  check_rope_qk(q, k);
  auto qo = at::empty(q.sizes(), q.options()), ko = at::empty(k.sizes(), k.options());
  rope_table_impl(q, k, qo, ko, cos, sin, backward);
  return {qo, ko};
}

void rope_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check_rope_qk(q, k);
  check_last_dim(q, true);
  check_last_dim(k, true);
  rope_table_impl(q, k, q, k, cos, sin, backward);
}

std::tuple<at::Tensor, at::Tensor> rope_pos_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                                const at::Tensor& inv_freq, double scaling, bool backward) {
  check_rope_qk(q, k);
  auto qo = at::empty(q.sizes(), q.options()), ko = at::empty(k.sizes(), k.options());
  rope_pos_impl(q, k, qo, ko, positions, inv_freq, scaling, backward);
  return {qo, ko};
}

void rope_pos_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& inv_freq,
                          double scaling, bool backward) {
  check_rope_qk(q, k);
  check_last_dim(q, true);
  check_last_dim(k, true);
  rope_pos_impl(q, k, q, k, positions, inv_freq, scaling, backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(seqpar, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_", &rope_inplace_cpu);
  m.impl("rope_pos", &rope_pos_cpu);
  m.impl("rope_pos_", &rope_pos_inplace_cpu);
}

}  // namespace seqpar
