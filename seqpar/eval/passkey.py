"""Passkey retrieval: a random 5-digit key hidden at a given depth in filler text.

The input at context length L is exactly L tokens:

    [bos] INTRO  filler[:d]  NEEDLE(key)  filler[d:F]  QUESTION  ANSWER(key)

where F is whatever filler makes the total L and d = round(depth * F): depth 0 puts the
needle right after the introduction, depth 1 right before the question.

Scoring is greedy decoding, done in ONE forward pass: the model is fed the prompt plus
the true answer, and the argmax at each answer position is compared with the answer
token. Greedy decoding reproduces the answer exactly iff every one of these argmaxes is
right (each greedy step sees exactly the prefix the teacher-forced pass sees, as long as
all earlier steps were right), so exact-match accuracy is the same as with generate(),
at the cost of one pass instead of one per token - which matters when the context is
long and sharded over ranks. `predicted` in the JSON is what greedy decoding generates,
up to and including its first wrong token. The answer is " " + key as the
tokenizer spells it; a model spelling the same digits with other tokens counts as wrong.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SeqparError
from ..tables import markdown_table
from ..units import format_tokens
from .runner import ShardedLM

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class PasskeyTemplate:
    """The texts of a passkey prompt; the default is the usual one (Landmark attention,
    LongLoRA, YaRN). A shorter one lets byte-level models be tested at short lengths."""

    intro: str = INTRO
    filler: str = FILLER
    needle: str = NEEDLE  # with {key}
    question: str = QUESTION
    answer: str = ANSWER  # with {key}


# Needle, question and answer only (~46 bytes): short lengths keep most of the context as filler.
COMPACT = PasskeyTemplate(intro="", needle=" The pass key is {key}.", question=" The pass key is")


@dataclass
class PasskeyPrompt:
    input_ids: list  # exactly `length` token ids: prompt + answer
    key: str
    needle_start: int  # index of the needle's first token
    filler_start: int  # index of the first filler token (after the introduction)
    filler_tokens: int  # F, the filler around the needle
    answer_start: int  # index of the answer's first token
    answer: list  # the answer's token ids

    @property
    def depth(self) -> float:
        """Where the needle actually sits: fraction of the filler before it."""
        return (self.needle_start - self.filler_start) / max(1, self.filler_tokens)


def _encode(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def random_key(seed, length: int, depth: float, trial: int) -> str:
    """A 5-digit key, reproducible from (seed, length, depth, trial)."""
    return str(random.Random(f"passkey:{seed}:{length}:{depth}:{trial}").randint(10000, 99999))


def build_prompt(tokenizer, length: int, depth: float, key: str,
                 template: PasskeyTemplate = PasskeyTemplate()) -> PasskeyPrompt:
    """The passkey input of exactly `length` tokens with the needle at `depth` (0..1)."""
    if not 0.0 <= depth <= 1.0:
        raise SeqparError(f"depth {depth} must lie in [0, 1] (fraction of the context before the key).")
    bos = getattr(tokenizer, "bos_token_id", None)
    head = ([bos] if bos is not None else []) + (_encode(tokenizer, template.intro) if template.intro else [])
    needle = _encode(tokenizer, template.needle.format(key=key))
    tail = _encode(tokenizer, template.question)
    answer = _encode(tokenizer, template.answer.format(key=key))
    budget = length - len(head) - len(needle) - len(tail) - len(answer)
    if budget < 0:
        raise SeqparError(f"passkey length {length} is too short: the introduction, key and question "
                          f"alone take {length - budget} tokens with this tokenizer; use longer lengths.")
    sentence = _encode(tokenizer, template.filler)
    filler = (sentence * (budget // len(sentence) + 1))[:budget]
    before = round(depth * budget)
    ids = head + filler[:before] + needle + filler[before:] + tail + answer
    return PasskeyPrompt(input_ids=ids, key=key, needle_start=len(head) + before, filler_start=len(head),
                         filler_tokens=budget, answer_start=length - len(answer), answer=answer)


def predict_answer(lm: ShardedLM, prompt: PasskeyPrompt, pad_id: int) -> list:
    """The model's greedy (teacher-forced) token at each answer position; the same list
    on every SP rank."""
    ids = list(prompt.input_ids)
    ids += [pad_id] * (-len(ids) % lm.multiple)  # after the answer: causal, so never seen
    hidden, _, index = lm.run(torch.tensor([ids]))
    n = len(prompt.answer)
    first = prompt.answer_start - 1  # the token before an answer token predicts it
    pick = (index >= first) & (index < first + n)
    preds = torch.full((n,), -1, dtype=torch.long, device=hidden.device)
    if bool(pick.any()):
        preds[index[pick] - first] = lm.argmax(hidden[0, pick])
    if lm.sharded:  # each answer position lives on one rank: the max collects them
        dist.all_reduce(preds, op=dist.ReduceOp.MAX, group=lm.mesh.sp_group)
    return preds.tolist()


def evaluate_passkey(model, tokenizer, lengths, depths, *, trials: int = 5, seed: int = 0, mesh=None,
                     layout: str = "zigzag", attention: str = "ring", fused_rope: bool = False,
                     template: PasskeyTemplate = PasskeyTemplate(), log=None) -> dict:
    """Passkey accuracy per (length, depth) over `trials` random keys (texts: `template`).

    Returns {"lengths", "depths", "trials", "accuracy": [[per depth] per length],
    "cells": [{"length", "depth", "accuracy", "correct", "samples": [{"key", "predicted",
    "correct", "depth"}]}], and the settings}. Every rank of `mesh` calls it alike.
    """
    if trials < 1:
        raise SeqparError(f"trials must be >= 1; got {trials}.")
    lm = ShardedLM(model, mesh, attention=attention, layout=layout, fused_rope=fused_rope)
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    pad_id = next((i for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                   if i is not None), 0)
    jobs = [(n, d, t) for n in lengths for d in depths for t in range(trials)]
    prompts = [build_prompt(tokenizer, n, d, random_key(seed, n, d, t), template) for n, d, t in jobs]
    width = max(len(p.answer) for p in prompts)
    preds = torch.full((len(jobs), width), -1, dtype=torch.long)
    start = time.perf_counter()
    for j in range(lm.dp_rank, len(jobs), lm.dp_size):  # DP groups share the trials
        got = predict_answer(lm, prompts[j], pad_id)
        preds[j, :len(got)] = torch.tensor(got)
    preds = lm.all_reduce(preds, op=dist.ReduceOp.MAX)

    cells, grid = [], []
    for n in lengths:
        grid.append([])
        for d in depths:
            samples = []
            for j, (jn, jd, _) in enumerate(jobs):
                if (jn, jd) != (n, d):
                    continue
                p, got = prompts[j], preds[j, :len(prompts[j].answer)].tolist()
                wrong = next((i for i, (a, b) in enumerate(zip(got, p.answer)) if a != b), len(got))
                samples.append({"key": p.key, "predicted": tokenizer.decode(got[:wrong + 1]),
                                "correct": got == p.answer, "depth": round(p.depth, 4)})
            correct = sum(s["correct"] for s in samples)
            cells.append({"length": n, "depth": d, "accuracy": correct / trials, "correct": correct,
                          "trials": trials, "samples": samples})
            grid[-1].append(correct / trials)
        if log is not None and lm.is_writer:
            log(f"passkey @ {format_tokens(n)}: accuracy by depth "
                + " ".join(f"{d:g}:{a:.2f}" for d, a in zip(depths, grid[-1])))
    if log is not None and lm.is_writer:
        log(f"passkey: {len(jobs)} trials in {time.perf_counter() - start:.1f} s")
    return {"eval": "passkey", "lengths": lengths, "depths": depths, "trials": trials, "seed": seed,
            "sp_size": lm.sp_size, "attention": lm.attention if lm.sharded else None,
            "layout": lm.layout if lm.sharded else None, "accuracy": grid, "cells": cells}


def markdown(result: dict) -> str:
    """Accuracy grid: one row per length, one column per depth."""
    depths = result["depths"]
    rows = [[format_tokens(n), *(f"{a:.2f}" for a in row)] for n, row in zip(result["lengths"], result["accuracy"])]
    return "\n".join([f"{result.get('label', 'model')}: passkey accuracy ({result['trials']} trials per cell)",
                      *markdown_table(["length", *(f"depth {d:g}" for d in depths)], rows, "r" * (1 + len(depths)))])
