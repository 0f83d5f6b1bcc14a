"""Perplexity by evaluation length, and loss by position within the sequence.

Evaluation sequences at length L: the corpus of `data_cfg` as the trainer packs it
(documents shuffled by `data_cfg.seed`, each `[bos] + tokens + [eos]`, laid end to end)
cut every L tokens, with PLAIN positions 0..L-1 (`cross_document_attention=True`, no
up-sampling). So the model sees up to L tokens of context, across document boundaries
as in the usual perplexity-vs-length protocol, and every token of a sequence is scored.
The first `num_sequences` sequences are used; since the document order does not depend
on L, a sequence at 2L holds the text of two sequences at L.

Reported per length: mean token NLL (natural log) and perplexity = exp(NLL) over all
scored tokens, and the same per position bucket: bucket b holds the tokens whose index
in the sequence (= number of tokens of context before them) is in
[b*L/buckets, (b+1)*L/buckets). A model that uses far context has lower loss in later
buckets; one that breaks past its trained length has higher.

Under sequence parallelism each rank scores only its shard (`reduction="none"`), sorts
its tokens into buckets by their global index, and one all-reduce of [loss sum, count]
per bucket gives the same numbers as one process scoring the whole sequence.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..errors import SeqparError
from .runner import ShardedLM, format_length

IGNORE_INDEX = -100


def eval_sequences(data_cfg, tokenizer, length: int, num_sequences: int) -> torch.Tensor:
    """input_ids [n, length] (n <= num_sequences) of the evaluation stream at `length`."""
    from ..data import build_packed_dataset
    from ..train.config import DataConfig

    if isinstance(data_cfg, dict):
        data_cfg = DataConfig(**data_cfg)
    cfg = dataclasses.replace(data_cfg, cross_document_attention=True, upsample_long=0.0)
    try:
        ds = build_packed_dataset(cfg, tokenizer, length)
    except SeqparError as err:
        if "fewer than one sequence" not in str(err):
            raise
        raise SeqparError(f"the evaluation data has fewer than {length} tokens, one sequence at length "
                          f"{format_length(length)}; add --data sources, raise --max-documents or drop "
                          "that length.") from None
    n = min(num_sequences, len(ds))
    return ds.get_batch(range(n))["input_ids"]


def _summary(total: float, count: int) -> dict:
    nll = total / count if count else float("nan")
    try:
        ppl = math.exp(nll)
    except OverflowError:
        ppl = float("inf")
    return {"nll": nll, "ppl": ppl, "tokens": int(count)}


def bucket_totals(lm: ShardedLM, input_ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """float64 [2, buckets]: this rank's (loss sum, token count) per position bucket."""
    seq_len = input_ids.shape[1]
    hidden, labels, index = lm.run(input_ids)
    losses = lm.token_losses(hidden, labels)
    # Token t's label is token t + 1: bucket by the predicted token's index.
    target = (index + 1).expand_as(labels)
    valid = labels != IGNORE_INDEX
    bucket = (target[valid] * buckets) // seq_len
    totals = torch.zeros(2, buckets, dtype=torch.float64, device=losses.device)
    totals[0].index_add_(0, bucket, losses[valid].double())
    totals[1].index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
    return totals.cpu()


def evaluate_perplexity(model, tokenizer, data_cfg, lengths, *, mesh=None, layout: str = "zigzag",
                        attention: str = "ring", num_sequences: int = 8, buckets: int = 8,
                        fused_rope: bool = False, log=None) -> dict:
    """Mean token NLL and perplexity at each evaluation length, with loss by position bucket.

    `model`: a Hugging Face causal LM (parallelized here, once, when `mesh` has SP size >
    1; every rank of the mesh calls this with the same arguments). `data_cfg`: a seqpar
    `DataConfig` (or its fields as a dict). `log(str)`: progress lines, rank 0 only.
    Returns {"lengths": [{"length", "sequences", "nll", "ppl", "tokens", "buckets":
    [{"start", "end", "nll", "ppl", "tokens"}, ...]}, ...], and the settings}.
    """
    if buckets < 1:
        raise SeqparError(f"buckets must be >= 1; got {buckets}.")
    if num_sequences < 1:
        raise SeqparError(f"num_sequences must be >= 1; got {num_sequences}.")
    lm = ShardedLM(model, mesh, attention=attention, layout=layout, fused_rope=fused_rope)
    lengths = [int(n) for n in lengths]
    for length in lengths:
        if length % lm.multiple or length < buckets:
            raise SeqparError(f"evaluation length {length} must be a multiple of {lm.multiple} (layout "
                              f"{lm.layout} over {lm.sp_size} SP ranks) and at least buckets={buckets}.")
    results = []
    for length in lengths:
        start = time.perf_counter()
        seqs = lm.rank0_first(lambda: eval_sequences(data_cfg, tokenizer, length, num_sequences))
        totals = torch.zeros(2, buckets, dtype=torch.float64)
        for i in range(lm.dp_rank, len(seqs), lm.dp_size):
            totals += bucket_totals(lm, seqs[i:i + 1], buckets)
        totals = lm.all_reduce(totals)
        row = {"length": length, "sequences": len(seqs),
               **_summary(totals[0].sum().item(), int(totals[1].sum().item())), "buckets": []}
        for b in range(buckets):
            row["buckets"].append({"start": -(-b * length // buckets), "end": -(-(b + 1) * length // buckets),
                                   **_summary(totals[0, b].item(), int(totals[1, b].item()))})
        results.append(row)
        if log is not None and lm.is_writer:
            log(f"ppl @ {format_length(length)}: nll {row['nll']:.4f}  ppl {row['ppl']:.3f}  "
                f"({row['sequences']} sequences, {row['tokens']} tokens, {time.perf_counter() - start:.1f} s)")
    return {"eval": "ppl", "sp_size": lm.sp_size, "attention": lm.attention if lm.sharded else None,
            "layout": lm.layout if lm.sharded else None, "num_sequences": num_sequences,
            "buckets": buckets, "lengths": results}


def markdown(results: list[dict]) -> str:
    """Perplexity per length, one column per result (label), then the first result's loss
    by position bucket."""
    labels = [r.get("label") or f"run {i}" for i, r in enumerate(results)]
    lengths = sorted({row["length"] for r in results for row in r["lengths"]})
    by = [{row["length"]: row for row in r["lengths"]} for r in results]
    lines = ["| length | " + " | ".join(f"{lab} ppl" for lab in labels) + " |",
             "|---:|" + "---:|" * len(labels)]
    for n in lengths:
        cells = [f"{b[n]['ppl']:.3f}" if n in b else "-" for b in by]
        lines.append(f"| {format_length(n)} | " + " | ".join(cells) + " |")
    main = results[0]
    k = main["buckets"]
    lines += ["", f"{labels[0]}: mean NLL by position (bucket b = token positions [b*L/{k}, (b+1)*L/{k}))",
              "| length | " + " | ".join(f"b{b}" for b in range(k)) + " |", "|---:|" + "---:|" * k]
    for row in main["lengths"]:
        lines.append(f"| {format_length(row['length'])} | "
                     + " | ".join(f"{b['nll']:.3f}" for b in row["buckets"]) + " |")
    return "\n".join(lines)
