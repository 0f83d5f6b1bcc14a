"""Perplexity by evaluation length on the SAME tokens, and loss by position in the window.

Protocol (the sliding-window evaluation of the Position Interpolation and YaRN papers,
restricted to one fixed set of scored tokens so rows are comparable):

- Evaluation text: the corpus of `data_cfg` as the trainer packs it (documents shuffled
  by `data_cfg.seed`, each `[bos] + tokens + [eos]`, laid end to end, positions plain)
  cut into the first `num_sequences` sequences of T = max(lengths) + (windows - 1) *
  stride tokens. T does not depend on the length being evaluated.
- Scored tokens: the last `windows * stride` tokens of each sequence, the same at every
  length.
- At length L, window j (j = 0 .. windows-1) is the L tokens ending at
  T - (windows-1-j) * stride; it scores its last `stride` tokens. So every scored token
  is predicted from between L - stride and L - 1 tokens of context (plain positions
  0..L-1 in the window, across document boundaries), and a longer L only adds context.
  `stride` < min(lengths); the default is min(lengths) // 2.

Reported per length: mean token NLL (natural log) and perplexity = exp(NLL) over the
scored tokens, and `tokens` (their count: equal at every length). A model that ignores
context gives the same perplexity at every length; one that uses far context gets
lower perplexity at longer lengths; one that breaks past its trained length, higher.

Loss by position: every token of every window, bucket b holding the tokens whose index
in the window (= context before them) is in [b*L/buckets, (b+1)*L/buckets): does the
model use far context, or does it break past a position?

Under sequence parallelism each rank scores only its shard (`reduction="none"`), sorts
its tokens by their global index in the window, and one all-reduce of [loss sum, count]
per bucket (and for the scored tokens) gives the numbers of one process.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..data import DataConfig, build_packed_dataset
from ..errors import SeqparError
from ..tables import markdown_table
from ..units import format_tokens
from .runner import ShardedLM

IGNORE_INDEX = -100
BATCH_TOKENS = 16384  # windows per forward pass (unsharded): at most this many tokens


def eval_sequences(data_cfg, tokenizer, length: int, num_sequences: int) -> torch.Tensor:
    """input_ids [n, length] (n <= num_sequences): the evaluation stream cut every `length` tokens."""
    if isinstance(data_cfg, dict):
        data_cfg = DataConfig(**data_cfg)
    cfg = dataclasses.replace(data_cfg, cross_document_attention=True, upsample_long=0.0)
    try:
        ds = build_packed_dataset(cfg, tokenizer, length)
    except SeqparError as err:
        if "fewer than one sequence" not in str(err):
            raise
        raise SeqparError(f"the evaluation data has fewer than {length} tokens, one evaluation sequence "
                          f"({format_tokens(length)}); add --data sources, raise --max-documents or drop "
                          "the longest length.") from None
    n = min(num_sequences, len(ds))
    return ds.get_batch(range(n))["input_ids"]


def default_stride(lengths) -> int:
    return max(1, min(lengths) // 2)


def window_ends(lengths, stride: int, windows: int) -> tuple[int, list[int]]:
    """(T, ends): the evaluation sequence length and the end index of each window (the
    same at every length); window j at length L is [ends[j] - L, ends[j]) and scores the
    tokens at positions [ends[j] - stride, ends[j]) of the sequence."""
    if windows < 1:
        raise SeqparError(f"windows must be >= 1; got {windows}.")
    if not 1 <= stride < min(lengths):
        raise SeqparError(f"stride {stride} must be at least 1 and below the shortest length {min(lengths)} "
                          "(a window scores its last `stride` tokens from at least L - stride of context).")
    total = max(lengths) + (windows - 1) * stride
    return total, [total - (windows - 1 - j) * stride for j in range(windows)]


def _summary(total: float, count: int) -> dict:
    nll = total / count if count else float("nan")
    try:
        ppl = math.exp(nll)
    except OverflowError:
        ppl = float("inf")
    return {"nll": nll, "ppl": ppl, "tokens": int(count)}


def window_totals(lm: ShardedLM, windows: torch.Tensor, buckets: int, stride: int) -> torch.Tensor:
    """float64 [2, buckets + 1]: this rank's (loss sum, token count) per position bucket
    over every token of the windows [b, L], and in the last column over the scored ones
    (the last `stride` of each window)."""
    length = windows.shape[1]
    hidden, labels, index = lm.run(windows)
    losses = lm.token_losses(hidden, labels)
    # Token t's label is token t + 1: bucket by the predicted token's index in the window.
    target = (index + 1).expand_as(labels)
    valid = labels != IGNORE_INDEX
    bucket = (target * buckets) // length
    column = torch.where(valid, bucket, torch.full_like(bucket, buckets + 1))  # invalid -> dropped
    totals = torch.zeros(2, buckets + 2, dtype=torch.float64, device=losses.device)
    totals[0].index_add_(0, column.flatten(), losses.double().flatten())
    totals[1].index_add_(0, column.flatten(), valid.double().flatten())
    scored = valid & (target >= length - stride)
    totals[0, buckets] = losses.double()[scored].sum()
    totals[1, buckets] = scored.double().sum()
    return totals[:, :buckets + 1].cpu()


def evaluate_perplexity(model, tokenizer, data_cfg, lengths, *, mesh=None, layout: str = "zigzag",
                        attention: str = "ring", num_sequences: int = 8, buckets: int = 8,
                        stride: int | None = None, windows: int = 1, fused_rope: bool = False,
                        log=None) -> dict:
    """Perplexity of the same scored tokens at each evaluation length (see the module
    docstring), with loss by position bucket over whole windows.

    `model`: a Hugging Face causal LM (parallelized here, once, when `mesh` has SP size >
    1; every rank of the mesh calls this with the same arguments). `data_cfg`: a seqpar
    `DataConfig` (or its fields as a dict). `stride`: tokens scored per window (default
    min(lengths) // 2); `windows`: windows per sequence. `log(str)`: progress, rank 0.
    Returns {"lengths": [{"length", "sequences", "nll", "ppl", "tokens", "context",
    "buckets": [{"start", "end", "nll", "ppl", "tokens"}, ...]}, ...], and the settings}.
    """
    if buckets < 1:
        raise SeqparError(f"buckets must be >= 1; got {buckets}.")
    if num_sequences < 1:
        raise SeqparError(f"num_sequences must be >= 1; got {num_sequences}.")
    lengths = sorted(int(n) for n in lengths)
    stride = default_stride(lengths) if stride is None else int(stride)
    total, ends = window_ends(lengths, stride, windows)
    lm = ShardedLM(model, mesh, attention=attention, layout=layout, fused_rope=fused_rope)
    for length in lengths:
        if length % lm.multiple or length < buckets:
            raise SeqparError(f"evaluation length {length} must be a multiple of {lm.multiple} (layout "
                              f"{lm.layout} over {lm.sp_size} SP ranks) and at least buckets={buckets}.")
    seqs = lm.rank0_first(lambda: eval_sequences(data_cfg, tokenizer, total, num_sequences))
    results = []
    for length in lengths:
        start = time.perf_counter()
        wins = torch.stack([seqs[i, end - length:end] for i in range(len(seqs)) for end in ends])
        per_batch = 1 if lm.sharded else max(1, BATCH_TOKENS // length)
        batches = [wins[i:i + per_batch] for i in range(0, len(wins), per_batch)]
        totals = torch.zeros(2, buckets + 1, dtype=torch.float64)
        for i in range(lm.dp_rank, len(batches), lm.dp_size):
            totals += window_totals(lm, batches[i], buckets, stride)
        totals = lm.all_reduce(totals)
        row = {"length": length, "sequences": len(seqs), "windows": len(wins),
               **_summary(totals[0, buckets].item(), int(totals[1, buckets].item())),
               "context": [length - stride, length - 1], "buckets": []}
        for b in range(buckets):
            row["buckets"].append({"start": -(-b * length // buckets), "end": -(-(b + 1) * length // buckets),
                                   **_summary(totals[0, b].item(), int(totals[1, b].item()))})
        results.append(row)
        if log is not None and lm.is_writer:
            log(f"ppl @ {format_tokens(length)}: nll {row['nll']:.4f}  ppl {row['ppl']:.3f}  ({row['tokens']} "
                f"scored tokens, context {length - stride}-{length - 1}, {len(wins)} windows, "
                f"{time.perf_counter() - start:.1f} s)")
    return {"eval": "ppl", "protocol": "same-tokens", "sp_size": lm.sp_size,
            "attention": lm.attention if lm.sharded else None, "layout": lm.layout if lm.sharded else None,
            "num_sequences": num_sequences, "sequence_length": total, "stride": stride, "windows": windows,
            "buckets": buckets, "lengths": results}


def markdown(results: list[dict]) -> str:
    """Perplexity per length (and the scored tokens), one column per result (label), then
    the first result's loss by position bucket."""
    labels = [r.get("label") or f"run {i}" for i, r in enumerate(results)]
    lengths = sorted({row["length"] for r in results for row in r["lengths"]})
    by = [{row["length"]: row for row in r["lengths"]} for r in results]
    rows = [[format_tokens(n), "/".join(sorted({str(b[n]["tokens"]) for b in by if n in b})),
             *(f"{b[n]['ppl']:.3f}" if n in b else "-" for b in by)] for n in lengths]
    lines = markdown_table(["length", "scored tokens", *(f"{lab} ppl" for lab in labels)], rows,
                           "r" * (2 + len(labels)))
    main = results[0]
    k = main["buckets"]
    lines += ["", f"{labels[0]}: mean NLL by position (bucket b = token positions [b*L/{k}, (b+1)*L/{k}))"]
    lines += markdown_table(["length", *(f"b{b}" for b in range(k))],
                            [[format_tokens(row["length"]), *(f"{b['nll']:.3f}" for b in row["buckets"])]
                             for row in main["lengths"]], "r" * (1 + k))
    return "\n".join(lines)
