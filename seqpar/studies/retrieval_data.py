"""The study's training corpus: real text plus synthetic passkey-retrieval documents.

Real text: Python's standard library sources (present on every machine, offline), in
sorted file order, skipping the `xml` package (the held-out evaluation text).

Retrieval documents teach a position-dependent skill that plain text at these sizes
barely needs: find a 5-digit key said once, arbitrarily far back, and repeat it. Each is
the evaluation template's needle (" The pass key is 12345.") at a random place in its
filler sentences, then its question and answer (" The pass key is" -> " 12345") asked
1..4 times at random places after it. Asking several times gives denser supervision:
each document gives several answers to learn from, the later ones also copyable from a
nearby earlier answer (the short-range case of the same skill); with one question per
episode the study's 2-layer model still guessed the key's first digit at chance after
2000 steps at lr 2e-3 (README; the study's lr 5e-4 is what made retrieval work). The
filler is the template's sentences only, so the key is the only number in the episode (real text is
in documents of its own). The evaluation asks once, after the needle only, and draws
its keys from another seed (keys are random per document, so none can be memorized).

Layout: every sequence the packer cuts (`length` tokens) holds exactly one piece, with
nothing cut at a place that matters. Each jsonl document is 2 x (length - 1) bytes (ASCII
only, so bytes = characters = tokens for the byte tokenizer): two retrieval episodes, or
real text. With bos and eos it is exactly two sequences; the packer cuts it in the
middle, and the second piece is a document of its own (positions restart, it cannot see
the first). So a first half is `bos + episode`, the evaluation prompt's exact shape (the
answer ends on the last position), and a second half is `episode + eos`. Why: documents
of mixed lengths get cut at sequence boundaries, and a passkey document cut between its
key and its question asks for a key the model cannot see, teaching guessing; and with
every document ending on the same position (one episode per sequence, then eos), the
model learned "eos at the last position" and missed the key's last digit at exactly L.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

from ..data.sources import stdlib_files
from ..eval.passkey import PasskeyTemplate

HELD_OUT_PACKAGE = "xml"


def real_text_files(count: int) -> list[str]:
    """The first `count` stdlib source files (sorted), the held-out package excluded."""
    files = sorted(f for f in stdlib_files() if f"/{HELD_OUT_PACKAGE}/" not in f.replace("\\", "/"))
    return files[:count]


def held_out_dir() -> str:
    return os.path.join(sysconfig.get_paths()["stdlib"], HELD_OUT_PACKAGE)


def retrieval_document(rng: random.Random, length: int, template: PasskeyTemplate, max_questions: int = 4) -> str:
    """One passkey document of exactly `length` characters: the needle, then the question
    and answer 1..max_questions times, filler (the template's) between them."""
    key = str(rng.randint(10000, 99999))
    needle, qa = template.needle.format(key=key), template.question + template.answer.format(key=key)
    asks = rng.randint(1, max(1, min(max_questions, (length - len(needle)) // len(qa))))  # as many as fit
    budget = max(0, length - len(needle) - asks * len(qa))
    filler = (template.filler * (budget // len(template.filler) + 1))[:budget]
    cuts = sorted(rng.randint(0, budget) for _ in range(asks)) + [budget]  # needle at cuts[0], questions after
    text = filler[:cuts[0]] + needle
    for start, end in zip(cuts, cuts[1:]):
        text += filler[start:end] + qa
    return text


def write_corpus(path, *, real_files: list[str], retrieval_docs: int, length: int, template: PasskeyTemplate,
                 seed: int) -> dict:
    """Write the jsonl corpus (one {"text"} per line) for sequences of `length` tokens:
    `retrieval_docs` passkey episodes two per document, and the real text cut into
    documents of the same size (two sequences each, see the module doc); returns its
    composition."""
    rng = random.Random(seed)
    half = length - 1  # bytes per sequence: + bos (first half) or + eos (second half)
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in real_files]
    pool = "\n".join(t.encode("ascii", "replace").decode("ascii") for t in texts if t.strip())
    real = [pool[i:i + 2 * half] for i in range(0, len(pool) - 2 * half + 1, 2 * half)]
    real = [c for c in real if c[:half].strip() and c[half:].strip()]  # the loader drops blank documents
    episodes = [retrieval_document(rng, half, template) for _ in range(2 * (retrieval_docs // 2))]
    docs = [a + b for a, b in zip(episodes[::2], episodes[1::2])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for text in real + docs:
            f.write(json.dumps({"text": text}) + "\n")
    return {"real_files": len(texts), "real_documents": len(real), "real_chars": sum(map(len, real)),
            "retrieval_documents": len(episodes), "retrieval_chars": sum(map(len, episodes)),
            "sequence_bytes": half}
