// Shared host-side helpers for the seqpar ops: argument checks and the explicit
// positions / document ids that define every mask (DESIGN.md: never a local arange).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <limits>
#include <utility>

namespace seqpar {

// A per-token int64 index (positions or doc ids) as [s] or [b, s]; kept alive by `t`.
struct TokenIndex {
  at::Tensor t;          // contiguous int64, undefined when absent
  int64_t bstride = 0;   // 0 when shared by every batch row
  const int64_t* ptr() const { return t.defined() ? t.data_ptr<int64_t>() : nullptr; }
};

inline TokenIndex token_index(const std::optional<at::Tensor>& t, int64_t batch, int64_t seq,
                              const at::Device& device, const char* name) {
  TokenIndex idx;
  if (!t.has_value() || !t->defined()) return idx;
  const at::Tensor& x = *t;
  bool ok = (x.dim() == 1 && x.size(0) == seq) ||
            (x.dim() == 2 && x.size(1) == seq && (x.size(0) == batch || x.size(0) == 1));
  TORCH_CHECK(ok, "seqpar: ", name, " must be shaped [seq] or [batch, seq] = [", batch, ", ", seq,
              "]; got ", x.sizes(), ". Pass this block's global token ", name, ".");
  idx.t = x.to(device, at::kLong).contiguous();
  idx.bstride = (x.dim() == 2 && x.size(0) == batch && batch > 1) ? seq : 0;
  return idx;
}

// Plain-pointer view of the mask inputs, usable on the host and (copied by value) on a GPU.
struct MaskView {
  bool causal;
  int64_t sq, sk;
  const int64_t* qpos; int64_t qpos_bs;
  const int64_t* kpos; int64_t kpos_bs;
  const int64_t* qdoc; int64_t qdoc_bs;
  const int64_t* kdoc; int64_t kdoc_bs;
};

struct MaskArgs {
  bool causal;
  TokenIndex qpos, kpos, qdoc, kdoc;
  MaskView view(int64_t sq, int64_t sk) const {
    return MaskView{causal, sq, sk,
                    qpos.ptr(), qpos.bstride, kpos.ptr(), kpos.bstride,
                    qdoc.ptr(), qdoc.bstride, kdoc.ptr(), kdoc.bstride};
  }
};

#ifdef __CUDACC__
#define SEQPAR_HD __host__ __device__ __forceinline__
#else
#define SEQPAR_HD inline
#endif

SEQPAR_HD int64_t q_pos(const MaskView& m, int64_t b, int64_t i) {
  return m.qpos ? m.qpos[b * m.qpos_bs + i] : i + (m.sk - m.sq);
}
SEQPAR_HD int64_t k_pos(const MaskView& m, int64_t b, int64_t j) {
  return m.kpos ? m.kpos[b * m.kpos_bs + j] : j;
}
SEQPAR_HD int64_t q_doc(const MaskView& m, int64_t b, int64_t i) { return m.qdoc ? m.qdoc[b * m.qdoc_bs + i] : 0; }
SEQPAR_HD int64_t k_doc(const MaskView& m, int64_t b, int64_t j) { return m.kdoc ? m.kdoc[b * m.kdoc_bs + j] : 0; }
SEQPAR_HD bool masked_any(const MaskView& m) { return m.causal || m.qdoc != nullptr; }

// Summary of a run of tokens, so whole tiles can be skipped (or left unmasked).
struct TileRange { int64_t pos_lo, pos_hi, doc_lo, doc_hi; };

// True when no query of tile `qr` may attend any key of tile `kr`.
SEQPAR_HD bool tile_empty(const MaskView& m, const TileRange& qr, const TileRange& kr) {
  if (m.causal && kr.pos_lo > qr.pos_hi) return true;
  if (m.qdoc && (kr.doc_hi < qr.doc_lo || kr.doc_lo > qr.doc_hi)) return true;
  return false;
}

inline MaskArgs mask_args(bool causal, int64_t batch, int64_t sq, int64_t sk, const at::Device& dev,
                          const std::optional<at::Tensor>& q_positions,
                          const std::optional<at::Tensor>& k_positions,
                          const std::optional<at::Tensor>& q_doc_ids,
                          const std::optional<at::Tensor>& k_doc_ids) {
  MaskArgs m;
  m.causal = causal;
  // Positions only matter for causal masks; without them queries align to the end of
  // the keys (bottom-right diagonal), as in seqpar.ops.masks.block_mask.
  if (causal) {
    m.qpos = token_index(q_positions, batch, sq, dev, "q_positions");
    m.kpos = token_index(k_positions, batch, sk, dev, "k_positions");
  }
  bool has_qd = q_doc_ids.has_value() && q_doc_ids->defined();
  bool has_kd = k_doc_ids.has_value() && k_doc_ids->defined();
  TORCH_CHECK(has_qd == has_kd, "seqpar: pass both q_doc_ids and k_doc_ids, or neither.");
  m.qdoc = token_index(q_doc_ids, batch, sq, dev, "q_doc_ids");
  m.kdoc = token_index(k_doc_ids, batch, sk, dev, "k_doc_ids");
  return m;
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "seqpar: attention expects bshd tensors [batch, seq, heads, head_dim]; got q", q.sizes(),
              " k", k.sizes(), " v", v.sizes(), ". Transpose [b, h, s, d] with .transpose(1, 2).");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "seqpar: q, k, v must share one dtype. Cast them to one dtype.");
  TORCH_CHECK(k.sizes() == v.sizes(), "seqpar: k and v must have the same shape; got ", k.sizes(),
              " and ", v.sizes(), ".");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "seqpar: q and k must share batch and head_dim; got q", q.sizes(), " k", k.sizes(), ".");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "seqpar: query heads (", q.size(2),
              ") must be a multiple of key/value heads (", k.size(2), ") for GQA/MQA.");
  TORCH_CHECK(q.device() == k.device() && k.device() == v.device(),
              "seqpar: q, k, v must be on one device.");
}

// The backward's inputs besides q, k, v: dout and out shaped as q, lse [batch, heads, seq]
// and delta (optional) shaped as lse, all floating point and on q's device.
inline void check_attention_bwd_args(const at::Tensor& q, const at::Tensor& dout, const at::Tensor& out,
                                     const at::Tensor& lse, const std::optional<at::Tensor>& delta) {
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "seqpar: dout and out must have q's shape ",
              q.sizes(), "; got dout", dout.sizes(), " out", out.sizes(), ".");
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == Sq,
              "seqpar: lse must be [batch, heads, seq] = [", B, ", ", Hq, ", ", Sq, "]; got ", lse.sizes(),
              ". Pass the lse the forward returned.");
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta)
    TORCH_CHECK(delta->sizes() == lse.sizes(), "seqpar: delta must have lse's shape ", lse.sizes(), "; got ",
                delta->sizes(), ". delta = rowsum(dout * out) as [batch, heads, seq].");
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"dout", &dout}, {"out", &out}, {"lse", &lse}, {"delta", has_delta ? &*delta : nullptr}};
  for (const auto& [name, t] : named) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device() == q.device(), "seqpar: attention backward got ", name, " on ", t->device(),
                " but q on ", q.device(), "; move ", name, " to q's device.");
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "seqpar: ", name, " must be floating point; got ",
                t->scalar_type(), ".");
  }
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace seqpar
