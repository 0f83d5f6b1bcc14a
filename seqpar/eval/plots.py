"""PNG plots of the evaluation results (matplotlib, Agg backend: no display needed).

    plot_perplexity([result, other, ...], "ppl.png")   # one line per result (label)
    plot_passkey(result, "passkey.png")                # accuracy heat map, length x depth
"""

from __future__ import annotations

from pathlib import Path

from ..units import format_tokens


def _pyplot():
    import matplotlib  # deferred: matplotlib (optional, heavy)

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: matplotlib

    return plt


def _labels(results) -> list[str]:
    return [r.get("label") or f"run {i}" for i, r in enumerate(results)]


def plot_perplexity(results: list[dict], path) -> Path:
    """Left: perplexity vs evaluation length (log2 x axis), one line per result. Right:
    mean NLL by position in the sequence: every length of a single result, or each
    result's longest length when comparing several."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = _labels(results)
    all_lengths = sorted({row["length"] for r in results for row in r["lengths"]})
    for label, r in zip(labels, results):
        rows = sorted(r["lengths"], key=lambda row: row["length"])
        left.plot([row["length"] for row in rows], [row["ppl"] for row in rows], marker="o", label=label)
    left.set_xscale("log", base=2)
    left.set_xticks(all_lengths, [format_tokens(n) for n in all_lengths])
    left.minorticks_off()
    ppls = [row["ppl"] for r in results for row in r["lengths"] if 0 < row["ppl"] < float("inf")]
    log_y = bool(ppls) and max(ppls) / min(ppls) > 8  # an explosion past the trained length
    if log_y:
        from matplotlib.ticker import FormatStrFormatter  # deferred: matplotlib

        left.set_yscale("log")
        left.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        left.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    left.set_xlabel("evaluation length (tokens)")
    left.set_ylabel("perplexity" + (" (log scale)" if log_y else ""))
    left.set_title("Perplexity vs context length")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    for label, r in zip(labels, results):
        rows = sorted(r["lengths"], key=lambda row: row["length"])
        if len(results) > 1:
            rows = rows[-1:]
        for row in rows:
            centers = [(b["start"] + b["end"]) / 2 for b in row["buckets"]]
            name = f"{label} @ {format_tokens(row['length'])}" if len(results) > 1 \
                else f"L = {format_tokens(row['length'])}"
            right.plot(centers, [b["nll"] for b in row["buckets"]], marker=".", label=name)
    right.set_xlabel("token position in the sequence (bucket centre)")
    right.set_ylabel("mean NLL (nats / token)")
    right.set_title("Loss by position" + (f": {labels[0]}" if len(results) == 1 else ""))
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_passkey(result: dict, path) -> Path:
    """Heat map of accuracy: one row per context length, one column per needle depth."""
    plt = _pyplot()
    lengths, depths, acc = result["lengths"], result["depths"], result["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 3, 0.55 * len(lengths) + 2))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [format_tokens(n) for n in lengths])
    ax.set_xlabel("depth of the pass key (0 = start of the context, 1 = end)")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if a < 0.2 or a > 0.85 else "black")  # the colour map's dark ends
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(f"Passkey retrieval: {result.get('label', 'model')} ({result['trials']} trials per cell)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
