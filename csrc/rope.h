// Host-side checks shared by the CPU and CUDA rope implementations.
#pragma once

#include <ATen/ATen.h>

namespace seqpar {

inline void check_rope_qk(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4,
              "seqpar: rope expects bshd q and k [batch, seq, heads, head_dim]; got q", q.sizes(),
              " k", k.sizes(), ". Transpose [b, h, s, d] with .transpose(1, 2).");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "seqpar: q and k must share batch, seq and head_dim; got q", q.sizes(), " k", k.sizes(), ".");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "seqpar: q and k must share one dtype.");
  TORCH_CHECK(q.device() == k.device(), "seqpar: q and k must be on one device.");
}

// cos/sin as [b or 1, s, r] in float (double for double q); returns (cos, sin, batch stride).
inline std::tuple<at::Tensor, at::Tensor, int64_t> rope_tables(const at::Tensor& q, const at::Tensor& cos,
                                                               const at::Tensor& sin) {
  const int64_t B = q.size(0), S = q.size(1), D = q.size(3);
  TORCH_CHECK(cos.sizes() == sin.sizes(), "seqpar: cos and sin must have one shape; got ", cos.sizes(),
              " and ", sin.sizes(), ".");
  bool ok = (cos.dim() == 2 && cos.size(0) == S) ||
            (cos.dim() == 3 && cos.size(1) == S && (cos.size(0) == B || cos.size(0) == 1));
  TORCH_CHECK(ok, "seqpar: cos/sin must be [seq, rot_dim] or [batch, seq, rot_dim] with seq = ", S,
              "; got ", cos.sizes(), ". Index them by this shard's position_ids.");
  const int64_t R = cos.size(-1);
  TORCH_CHECK(R % 2 == 0 && R <= D, "seqpar: cos/sin last dim (", R, ") must be even and <= head_dim (", D, ").");
  auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto c = cos.to(q.device(), acc).contiguous(), s = sin.to(q.device(), acc).contiguous();
  int64_t bs = (cos.dim() == 3 && cos.size(0) == B && B > 1) ? S * R : 0;
  return {c, s, bs};
}

// positions as int64 [b or 1, s] (batch stride returned) and inv_freq as float32 [r/2].
inline std::tuple<at::Tensor, at::Tensor, int64_t> rope_positions(const at::Tensor& q, const at::Tensor& positions,
                                                                  const at::Tensor& inv_freq) {
  const int64_t B = q.size(0), S = q.size(1), D = q.size(3);
  bool ok = (positions.dim() == 1 && positions.size(0) == S) ||
            (positions.dim() == 2 && positions.size(1) == S && (positions.size(0) == B || positions.size(0) == 1));
  TORCH_CHECK(ok, "seqpar: positions must be [seq] or [batch, seq] with seq = ", S, "; got ",
              positions.sizes(), ". Pass this shard's global position_ids.");
  TORCH_CHECK(inv_freq.dim() == 1 && 2 * inv_freq.size(0) <= D,
              "seqpar: inv_freq must be [rot_dim / 2] with rot_dim <= head_dim (", D, "); got ",
              inv_freq.sizes(), ".");
  auto p = positions.to(q.device(), at::kLong).contiguous();
  auto f = inv_freq.to(q.device(), at::kFloat).contiguous();
  int64_t bs = (positions.dim() == 2 && positions.size(0) == B && B > 1) ? S : 0;
  return {p, f, bs};
}

}  // namespace seqpar
