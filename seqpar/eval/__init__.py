"""Long-context evaluation: perplexity by length (with loss by position), passkey retrieval,
and their plots. Both run a model whole in one process or sharded over a sequence-parallel
group, so an evaluation length beyond one device's memory works.

    from seqpar.eval import evaluate_perplexity, evaluate_passkey
    ppl = evaluate_perplexity(model, tokenizer, data_cfg, [1024, 4096], mesh=mesh)
    keys = evaluate_passkey(model, tokenizer, [1024, 4096], [0, 0.5, 1], mesh=mesh)

Command line: `seqpar eval ppl ...` and `seqpar eval passkey ...` (seqpar/eval/cli.py).
Submodules are imported lazily: `seqpar --help` must not pay for torch.
"""

__all__ = ["evaluate_passkey", "evaluate_perplexity", "run_evals"]


def __getattr__(name):
    if name == "evaluate_perplexity":
        from .perplexity import evaluate_perplexity  # deferred: lazy package attributes (PEP 562)
        return evaluate_perplexity
    if name == "evaluate_passkey":
        from .passkey import evaluate_passkey  # deferred: as above
        return evaluate_passkey
    if name == "run_evals":
        from .cli import run_evals  # deferred: as above
        return run_evals
    raise AttributeError(f"module 'seqpar.eval' has no attribute {name!r}")
