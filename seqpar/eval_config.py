"""The evaluation settings, typed: the run config's `eval:` section and the defaults of
`seqpar eval ppl | passkey`, written once.

    eval:                                   # in a run YAML: after every stage
      ppl: {lengths: "8k,32k", data: {sources: [data/held_out.jsonl]}, num_sequences: 8}
      passkey: {lengths: "8k,32k", trials: 5}

A section left out (or null) is an evaluation not run; an `eval:` with neither `ppl` nor
`passkey` runs none.

Layer: this module sits below train/ and above data/ (tests/test_layers.py), not in
eval/. `RunConfig.eval` (seqpar/train/config.py) needs these classes and train/ must not
import eval/, while eval/ (which runs them) may import anything below it; the data config
is in data/ for the same reason. It imports nothing but the data config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data.config import DataConfig


def _stdlib() -> DataConfig:
    return DataConfig(sources=["stdlib"])


@dataclass
class PerplexityEvalConfig:
    """Perplexity at each length on the same scored tokens (seqpar/eval/perplexity.py)."""
    lengths: str  # required: evaluation lengths, e.g. "1k,4k" (k = 1024)
    # The evaluation text (not the training data); unset keys keep these defaults.
    data: DataConfig = field(default_factory=_stdlib)
    num_sequences: int = 8  # evaluation sequences (the same at every length)
    buckets: int = 8  # loss-by-position buckets per window
    # Tokens scored per window, the same at every length; None: the shortest length // 2.
    stride: int | None = None
    windows: int = 1  # windows per sequence, each `stride` further on


@dataclass
class PasskeyEvalConfig:
    """Retrieval of a 5-digit key hidden at each depth of filler text (seqpar/eval/passkey.py)."""
    lengths: str  # required: prompt lengths, e.g. "1k,4k"
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # 0 = start, 1 = end
    trials: int = 5  # random keys per (length, depth)
    seed: int = 0  # seed of the random keys


@dataclass
class EvalConfig:
    ppl: PerplexityEvalConfig | None = None  # None: no perplexity evaluation
    passkey: PasskeyEvalConfig | None = None  # None: no passkey evaluation
    # Stage-end evals (seqpar/stages.py) set out, attention and layout themselves: the
    # stage's checkpoint.dir/stageK/eval and parallel section (the mesh they run on).
    out: str | None = None  # output directory; None: <model dir>/eval
    label: str | None = None  # name in tables and plots; None: the model directory's name
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    attention: str = "ring"  # under sequence parallelism: ring | ulysses | hybrid
    layout: str = "zigzag"  # zigzag | contiguous | stripe
    tokenizer: str | None = None  # None: the model directory's; "byte" = the built-in byte tokenizer

    @property
    def enabled(self) -> bool:
        """True when at least one evaluation is configured."""
        return self.ppl is not None or self.passkey is not None
