// CPU block attention: flash-attention style forward (online softmax over key tiles,
// the [sq, sk] score matrix is never stored) and a recompute backward from the final lse.
// Accumulation is float32 (float64 for float64 inputs). GQA is handled by indexing the
// shared K/V head, never by expanding K/V.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace seqpar {
namespace {

constexpr int64_t BQ = 128;  // query rows per tile
// Keys per tile: large, so that the per-tile ATen calls (exp, reductions) and BLAS calls
// are few; 128 x 512 measured fastest of 64-256 x 128-512 (2048 tokens, 2 cores).
constexpr int64_t BK = 512;

template <typename acc_t>
constexpr acc_t neg_inf() { return -std::numeric_limits<acc_t>::infinity(); }

TileRange q_range(const MaskView& m, int64_t b, int64_t i0, int64_t i1) {
  TileRange r{INT64_MAX, INT64_MIN, INT64_MAX, INT64_MIN};
  for (int64_t i = i0; i < i1; ++i) {
    int64_t p = q_pos(m, b, i), d = q_doc(m, b, i);
    r.pos_lo = std::min(r.pos_lo, p); r.pos_hi = std::max(r.pos_hi, p);
    r.doc_lo = std::min(r.doc_lo, d); r.doc_hi = std::max(r.doc_hi, d);
  }
  return r;
}

TileRange k_range(const MaskView& m, int64_t b, int64_t j0, int64_t j1) {
  TileRange r{INT64_MAX, INT64_MIN, INT64_MAX, INT64_MIN};
  for (int64_t j = j0; j < j1; ++j) {
    int64_t p = k_pos(m, b, j), d = k_doc(m, b, j);
    r.pos_lo = std::min(r.pos_lo, p); r.pos_hi = std::max(r.pos_hi, p);
    r.doc_lo = std::min(r.doc_lo, d); r.doc_hi = std::max(r.doc_hi, d);
  }
  return r;
}

// Tile order that pairs early and late query tiles, so the contiguous ranges
// at::parallel_for hands to threads carry similar causal work.
inline int64_t balanced_tile(int64_t t, int64_t n) { return (t % 2 == 0) ? t / 2 : n - 1 - t / 2; }

// Row-major [rows, D] tile of a bshd tensor (row stride `rs` elements), converted to acc_t.
template <typename scalar_t, typename acc_t>
void load_rows(acc_t* dst, const scalar_t* src, int64_t rows, int64_t rs, int64_t D) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) dst[r * D + c] = static_cast<acc_t>(src[r * rs + c]);
}

// Row-major C[M, N] = op(A) op(B) (+ C when accumulate) through torch's BLAS: tile
// matmuls are where the time goes, and BLAS does them far better than plain loops.
template <typename acc_t>
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B,
        int64_t ldb, bool accumulate, acc_t* C, int64_t ldc) {
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto a = ta ? at::from_blob(const_cast<acc_t*>(A), {K, M}, {lda, 1}, opt).t()
              : at::from_blob(const_cast<acc_t*>(A), {M, K}, {lda, 1}, opt);
  auto b = tb ? at::from_blob(const_cast<acc_t*>(B), {N, K}, {ldb, 1}, opt).t()
              : at::from_blob(const_cast<acc_t*>(B), {K, N}, {ldb, 1}, opt);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (accumulate) c.addmm_(a, b);
  else at::mm_out(c, a, b);
}

// Scale the scores and set masked ones to -inf.
template <typename acc_t>
void mask_scores(acc_t* S, const MaskView& m, int64_t b, int64_t i0, int64_t rows, int64_t j0,
                 int64_t cols, acc_t scale, bool need_mask) {
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* s = S + i * BK;
    for (int64_t j = 0; j < cols; ++j) s[j] *= scale;
    if (!need_mask) continue;
    const int64_t qp = q_pos(m, b, i0 + i), qd = q_doc(m, b, i0 + i);
    for (int64_t j = 0; j < cols; ++j) {
      bool ok = (!m.causal || k_pos(m, b, j0 + j) <= qp) && (!m.qdoc || k_doc(m, b, j0 + j) == qd);
      if (!ok) s[j] = neg_inf<acc_t>();
    }
  }
}

// Tensor views of a tile buffer, for whole-tile ATen ops: their exp and reductions are
// vectorised (and dispatched by CPU capability), where a plain loop calls scalar std::exp.
template <typename acc_t>
at::Tensor tile_view(acc_t* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// One key tile of the online softmax: S (scaled, masked scores) becomes P = exp(S - m_new)
// in place; the running max m, sum l and output O rows are rescaled. A row that has seen
// no visible key yet keeps m = -inf, l = 0, P = 0 (its shift is taken as 0, never inf - inf).
template <typename acc_t>
void online_softmax(acc_t* S, int64_t rows, int64_t cols, acc_t* mx, acc_t* l, acc_t* o, int64_t D) {
  auto s = tile_view(S, rows, cols, BK);
  auto m = tile_view(mx, rows, 1, 1), sum = tile_view(l, rows, 1, 1), out = tile_view(o, rows, D, D);
  auto m_new = at::maximum(m, s.amax(1, /*keepdim=*/true));
  auto shift = at::where(at::isinf(m_new), at::zeros_like(m_new), m_new);
  auto alpha = (m - shift).exp_();  // 0 where m was -inf
  s.sub_(shift).exp_();
  sum.mul_(alpha).add_(s.sum(1, /*keepdim=*/true));
  out.mul_(alpha);
  m.copy_(m_new);
}

// How a (query tile, key tile) pair is computed: skipped (no query sees any key), in full,
// or with the per-element mask. Without positions or documents every tile is full.
enum class Tile { kSkip, kFull, kMasked };

Tile tile_kind(const MaskView& m, const TileRange& qr, const TileRange& kr) {
  if (tile_empty(m, qr, kr)) return Tile::kSkip;
  if (m.causal && kr.pos_hi > qr.pos_lo) return Tile::kMasked;
  if (m.qdoc && !(qr.doc_lo == qr.doc_hi && kr.doc_lo == kr.doc_hi && qr.doc_lo == kr.doc_lo)) return Tile::kMasked;
  return Tile::kFull;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse, const MaskView& m, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hk = k.size(2), G = Hq / Hk;
  const int64_t nqt = (Sq + BQ - 1) / BQ;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();

  at::parallel_for(0, B * Hq * nqt, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(BQ * D), kf(BK * D), vf(BK * D), S(BQ * BK), o(BQ * D), mx(BQ), l(BQ);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t qt = balanced_tile(w % nqt, nqt), bh = w / nqt, b = bh / Hq, h = bh % Hq;
      const int64_t hk = h / G, i0 = qt * BQ, rows = std::min(BQ, Sq - i0);
      load_rows(qf.data(), qp + ((b * Sq + i0) * Hq + h) * D, rows, Hq * D, D);
      std::fill(o.begin(), o.end(), acc_t(0));
      std::fill(mx.begin(), mx.end(), neg_inf<acc_t>());
      std::fill(l.begin(), l.end(), acc_t(0));
      const TileRange qr = q_range(m, b, i0, i0 + rows);
      for (int64_t j0 = 0; j0 < Sk; j0 += BK) {
        const int64_t cols = std::min(BK, Sk - j0);
        const Tile tile = masked_any(m) ? tile_kind(m, qr, k_range(m, b, j0, j0 + cols)) : Tile::kFull;
        if (tile == Tile::kSkip) continue;
        const bool need_mask = tile == Tile::kMasked;
        const int64_t koff = ((b * Sk + j0) * Hk + hk) * D;
        load_rows(kf.data(), kp + koff, cols, Hk * D, D);
        load_rows(vf.data(), vp + koff, cols, Hk * D, D);
        mm<acc_t>(false, true, rows, cols, D, qf.data(), D, kf.data(), D, false, S.data(), BK);  // S = Q K^T
        mask_scores(S.data(), m, b, i0, rows, j0, cols, scale, need_mask);
        online_softmax(S.data(), rows, cols, mx.data(), l.data(), o.data(), D);
        mm<acc_t>(false, false, rows, D, cols, S.data(), BK, vf.data(), D, true, o.data(), D);  // O += P V
      }
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* dst = op + ((b * Sq + i0 + i) * Hq + h) * D;
        const bool empty = l[i] == acc_t(0);  // fully masked row: out 0, lse -inf
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[i];
        for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<scalar_t>(o[i * D + c] * inv);
        lp[(b * Hq + h) * Sq + i0 + i] = empty ? neg_inf<acc_t>() : mx[i] + std::log(l[i]);
      }
    }
  });
}

// Recomputes P = exp(S - lse) and dS = P * (dP - delta) * scale for one (query tile,
// key tile) pair. Rows whose lse is -inf saw no key anywhere: their P is 0.
template <typename acc_t>
void probs_and_dscores(acc_t* P, acc_t* dS, const acc_t* qf, const acc_t* kf, const acc_t* dof,
                       const acc_t* vf, const acc_t* lse_rows, const acc_t* delta_rows,
                       const MaskView& m, int64_t b, int64_t i0, int64_t rows, int64_t j0,
                       int64_t cols, int64_t D, acc_t scale, bool need_mask) {
  mm<acc_t>(false, true, rows, cols, D, qf, D, kf, D, false, P, BK);   // S = Q K^T
  mask_scores(P, m, b, i0, rows, j0, cols, scale, need_mask);
  mm<acc_t>(false, true, rows, cols, D, dof, D, vf, D, false, dS, BK);  // dP = dO V^T
  auto p = tile_view(P, rows, cols, BK), ds = tile_view(dS, rows, cols, BK);
  auto lse = tile_view(const_cast<acc_t*>(lse_rows), rows, 1, 1);
  auto delta = tile_view(const_cast<acc_t*>(delta_rows), rows, 1, 1);
  // lse = -inf: the row saw no key anywhere; shifting by +inf makes its P exactly 0.
  p.sub_(at::where(at::isinf(lse), -lse, lse)).exp_();
  ds.sub_(delta).mul_(p).mul_(scale);
}

template <typename scalar_t>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const MaskView& m, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hk = k.size(2), G = Hq / Hk;
  const int64_t nqt = (Sq + BQ - 1) / BQ, nkt = (Sk + BK - 1) / BK;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* dop = dout.data_ptr<scalar_t>();
  const acc_t* lp = lse.data_ptr<acc_t>();
  const acc_t* dlp = delta.data_ptr<acc_t>();
  acc_t* dqp = dq.data_ptr<acc_t>();
  acc_t* dkp = dk.data_ptr<acc_t>();
  acc_t* dvp = dv.data_ptr<acc_t>();

  // Pass 1: dK, dV. One work item per (batch, kv head, key tile) owns its rows of dK/dV
  // and visits every query head of its GQA group, so no two threads write one row.
  at::parallel_for(0, B * Hk * nkt, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(BQ * D), dof(BQ * D), kf(BK * D), vf(BK * D), P(BQ * BK), dS(BQ * BK),
        dkf(BK * D), dvf(BK * D);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t kti = w % nkt, bh = w / nkt, b = bh / Hk, hk = bh % Hk;
      const int64_t j0 = kti * BK, cols = std::min(BK, Sk - j0);
      const int64_t koff = ((b * Sk + j0) * Hk + hk) * D;
      load_rows(kf.data(), kp + koff, cols, Hk * D, D);
      load_rows(vf.data(), vp + koff, cols, Hk * D, D);
      std::fill(dkf.begin(), dkf.end(), acc_t(0));
      std::fill(dvf.begin(), dvf.end(), acc_t(0));
      const TileRange kr = k_range(m, b, j0, j0 + cols);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t i0 = 0; i0 < Sq; i0 += BQ) {
          const int64_t rows = std::min(BQ, Sq - i0);
          const Tile tile = masked_any(m) ? tile_kind(m, q_range(m, b, i0, i0 + rows), kr) : Tile::kFull;
          if (tile == Tile::kSkip) continue;
          const bool need_mask = tile == Tile::kMasked;
          const int64_t qoff = ((b * Sq + i0) * Hq + h) * D;
          load_rows(qf.data(), qp + qoff, rows, Hq * D, D);
          load_rows(dof.data(), dop + qoff, rows, Hq * D, D);
          const int64_t roff = (b * Hq + h) * Sq + i0;
          probs_and_dscores(P.data(), dS.data(), qf.data(), kf.data(), dof.data(), vf.data(),
                            lp + roff, dlp + roff, m, b, i0, rows, j0, cols, D, scale, need_mask);
          mm<acc_t>(true, false, cols, D, rows, P.data(), BK, dof.data(), D, true, dvf.data(), D);  // dV += P^T dO
          mm<acc_t>(true, false, cols, D, rows, dS.data(), BK, qf.data(), D, true, dkf.data(), D);  // dK += dS^T Q
        }
      }
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t off = ((b * Sk + j0 + j) * Hk + hk) * D;
        std::copy(dkf.data() + j * D, dkf.data() + (j + 1) * D, dkp + off);
        std::copy(dvf.data() + j * D, dvf.data() + (j + 1) * D, dvp + off);
      }
    }
  });

  // Pass 2: dQ, one work item per (batch, query head, query tile).
  at::parallel_for(0, B * Hq * nqt, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(BQ * D), dof(BQ * D), kf(BK * D), vf(BK * D), P(BQ * BK), dS(BQ * BK), dqf(BQ * D);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t qt = balanced_tile(w % nqt, nqt), bh = w / nqt, b = bh / Hq, h = bh % Hq;
      const int64_t hk = h / G, i0 = qt * BQ, rows = std::min(BQ, Sq - i0);
      const int64_t qoff = ((b * Sq + i0) * Hq + h) * D;
      load_rows(qf.data(), qp + qoff, rows, Hq * D, D);
      load_rows(dof.data(), dop + qoff, rows, Hq * D, D);
      std::fill(dqf.begin(), dqf.end(), acc_t(0));
      const TileRange qr = q_range(m, b, i0, i0 + rows);
      const int64_t roff = (b * Hq + h) * Sq + i0;
      for (int64_t j0 = 0; j0 < Sk; j0 += BK) {
        const int64_t cols = std::min(BK, Sk - j0);
        const Tile tile = masked_any(m) ? tile_kind(m, qr, k_range(m, b, j0, j0 + cols)) : Tile::kFull;
        if (tile == Tile::kSkip) continue;
        const bool need_mask = tile == Tile::kMasked;
        const int64_t koff = ((b * Sk + j0) * Hk + hk) * D;
        load_rows(kf.data(), kp + koff, cols, Hk * D, D);
        load_rows(vf.data(), vp + koff, cols, Hk * D, D);
        probs_and_dscores(P.data(), dS.data(), qf.data(), kf.data(), dof.data(), vf.data(),
                          lp + roff, dlp + roff, m, b, i0, rows, j0, cols, D, scale, need_mask);
        mm<acc_t>(false, false, rows, D, cols, dS.data(), BK, kf.data(), D, true, dqf.data(), D);  // dQ += dS K
      }
      for (int64_t i = 0; i < rows; ++i)
        std::copy(dqf.data() + i * D, dqf.data() + (i + 1) * D, dqp + ((b * Sq + i0 + i) * Hq + h) * D);
    }
  });
}

void check_float(const at::Tensor& q) {
  auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "seqpar: attention supports float32, float64, bfloat16 and float16; got ", t, ".");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal, double scale,
    const std::optional<at::Tensor>& q_positions, const std::optional<at::Tensor>& k_positions,
    const std::optional<at::Tensor>& q_doc_ids, const std::optional<at::Tensor>& k_doc_ids) {
  check_qkv(q_in, k_in, v_in);
  check_float(q_in);
  // Ring/Ulysses pass strided views (slices of a stacked K/V): the kernel wants bshd rows.
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), Sk = k.size(1);
  MaskArgs ma = mask_args(causal, B, Sq, Sk, q.device(), q_positions, k_positions, q_doc_ids, k_doc_ids);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, Hq, Sq}, q.options().dtype(acc_type(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "seqpar_attention_fwd", [&] {
    forward_impl<scalar_t>(q, k, v, out, lse, ma.view(Sq, Sk), scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& delta_in,
    bool causal, double scale, const std::optional<at::Tensor>& q_positions,
    const std::optional<at::Tensor>& k_positions, const std::optional<at::Tensor>& q_doc_ids,
    const std::optional<at::Tensor>& k_doc_ids) {
  check_qkv(q_in, k_in, v_in);
  check_float(q_in);
  check_attention_bwd_args(q_in, dout_in, out_in, lse_in, delta_in);
  const int64_t B = q_in.size(0), Sq = q_in.size(1), Sk = k_in.size(1);
  const auto acc = acc_type(q_in.scalar_type());
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto dout = dout_in.to(q.scalar_type()).contiguous();
  auto lse = lse_in.to(acc).contiguous();
  at::Tensor delta;
  if (delta_in.has_value() && delta_in->defined()) {
    delta = delta_in->to(acc).contiguous();
  } else {  // delta = rowsum(dout * out), [b, h, s]
    delta = (dout.to(acc) * out_in.to(acc)).sum(-1).transpose(1, 2).contiguous();
  }
  MaskArgs ma = mask_args(causal, B, Sq, Sk, q.device(), q_positions, k_positions, q_doc_ids, k_doc_ids);
  auto dq = at::empty(q.sizes(), q.options().dtype(acc));
  auto dk = at::empty(k.sizes(), k.options().dtype(acc));
  auto dv = at::empty(v.sizes(), v.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "seqpar_attention_bwd", [&] {
    backward_impl<scalar_t>(dout, q, k, v, lse, delta, dq, dk, dv, ma.view(Sq, Sk), scale);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqpar, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace seqpar
