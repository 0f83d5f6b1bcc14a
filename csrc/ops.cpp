// Schemas of the seqpar custom ops. Implementations register per device in
// attention_cpu.cpp / rope_cpu.cpp (CPU) and the .cu files (CUDA); fake (meta) kernels
// and autograd are registered from Python (seqpar/ops/compiled.py).
#include <torch/library.h>

#include "attention_cuda_tiles.h"

TORCH_LIBRARY(seqpar, m) {
  // One block of attention: out [b, sq, hq, d] in q's dtype, lse [b, hq, sq] float32
  // (float64 for float64). Positions/doc ids are [s] or [b, s]; absent = no such mask.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, "
        "Tensor? q_positions=None, Tensor? k_positions=None, Tensor? q_doc_ids=None, "
        "Tensor? k_doc_ids=None) -> (Tensor out, Tensor lse)");
  // Recompute backward from the final lse (and delta = rowsum(dout * out) if given):
  // dq/dk/dv in the accumulation dtype, dk/dv with k's (unexpanded) head count.
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? delta, bool causal, float scale, Tensor? q_positions=None, "
        "Tensor? k_positions=None, Tensor? q_doc_ids=None, Tensor? k_doc_ids=None) "
        "-> (Tensor dq, Tensor dk, Tensor dv)");
  // Half-rotation RoPE of q and k (bshd) with given cos/sin ([s, r] or [b, s, r], r <= d,
  // the half-duplicated layout transformers produces). backward=True applies the
  // transpose (rotation by -sin), which is the gradient.
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool backward=False) -> (Tensor, Tensor)");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool backward=False) -> ()");
  // Same, with cos/sin computed in-kernel: angle = position * inv_freq, times `scaling`
  // (transformers' attention_scaling, e.g. YaRN's mscale).
  m.def("rope_pos(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, float scaling, "
        "bool backward=False) -> (Tensor, Tensor)");
  m.def("rope_pos_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor inv_freq, float scaling, "
        "bool backward=False) -> ()");
  // Shared memory per block the CUDA attention kernels need for a head_dim (0: no kernel
  // for it). Defined in every build, so Python can compare it with a GPU's limit.
  m.def("attention_cuda_smem_bytes(int head_dim) -> int", &seqpar::attention_cuda_smem_bytes);
}
