"""The study's training corpus: real text plus synthetic passkey-retrieval documents.

Real text: whole source files of Python's standard library (present on every machine,
offline), in sorted order, skipping the `xml` package (the held-out evaluation text).

Retrieval documents teach a position-dependent skill that plain text at these sizes
barely needs: find a 5-digit key said once, arbitrarily far back, and repeat it.
Each is `filler[:d] + needle(key) + filler[d:] + question + answer(key)` with the texts
of the passkey evaluation's template, a random key and depth, and a length drawn
uniformly between `min_len` and `max_len` characters (bytes = tokens for the byte
tokenizer). Half use the evaluation's repeated filler sentences, half a random stretch of
real text, so retrieval does not depend on one filler. The evaluation draws its keys
from another seed; a copied key would not help anyway (keys are random per document).
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


def retrieval_document(rng: random.Random, length: int, template: PasskeyTemplate, real_text: str) -> str:
    key = str(rng.randint(10000, 99999))
    needle, question, answer = (template.needle.format(key=key), template.question,
                                template.answer.format(key=key))
    budget = max(0, length - len(needle) - len(question) - len(answer))
    if rng.random() < 0.5 or len(real_text) < budget + 1:
        filler = (template.filler * (budget // len(template.filler) + 1))[:budget]
    else:
        start = rng.randrange(0, len(real_text) - budget)
        filler = real_text[start:start + budget]
    cut = rng.randint(0, budget)
    return filler[:cut] + needle + filler[cut:] + question + answer


def write_corpus(path, *, real_files: list[str], retrieval_docs: int, min_len: int, max_len: int,
                 template: PasskeyTemplate, seed: int) -> dict:
    """Write the jsonl corpus (one {"text"} per line); returns its composition."""
    rng = random.Random(seed)
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in real_files]
    texts = [t for t in texts if t.strip()]
    pool = "\n".join(texts)
    docs = [retrieval_document(rng, rng.randint(min_len, max_len), template, pool) for _ in range(retrieval_docs)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for text in texts + docs:
            f.write(json.dumps({"text": text}) + "\n")
    return {"real_documents": len(texts), "real_chars": sum(map(len, texts)), "retrieval_documents": len(docs),
            "retrieval_chars": sum(map(len, docs)), "retrieval_lengths": [min_len, max_len]}
