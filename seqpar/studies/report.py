"""The extension study's outputs: results.json, table.md, study.png, and the literature's
qualitative ordering checked point by point on the measured numbers (the checks only
read the table; nothing is tuned to them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..tables import markdown_table
from ..units import format_tokens

NAMES = {"none": "none", "linear": "PI (linear)", "dynamic": "dynamic NTK", "abf": "ABF", "yarn": "YaRN",
         "llama3": "Llama-3"}



def _row(results, method, factor, stage):
    for r in results["rows"]:
        if r["stage"] == stage and r["method"] == method and (stage == "base" or r["factor"] == factor):
            return r
    return None


def _zero_shot(results, method, factor):
    return _row(results, "none", None, "base") if method == "none" else _row(results, method, factor, "zero-shot")


def checks(results: dict) -> list[dict]:
    """Each qualitative claim of the literature, with the numbers it was judged on."""
    lengths, L = results["lengths"], results["base_length"]
    base = _row(results, "none", None, "base")
    i = {n: k for k, n in enumerate(lengths)}
    base_L = base["ppl"][i[L]]
    out = []

    longer = [n for n in lengths if n > L]
    out.append({"claim": "no scaling breaks past L: zero-shot perplexity rises above its value at L at every "
                         "longer length",
                "holds": all(base["ppl"][i[n]] > base_L for n in longer),
                "measured": {f"none@{format_tokens(n)}": base["ppl"][i[n]] for n in lengths}})
    passkey = {f"none@{format_tokens(n)}": sum(base["passkey"][i[n]]) / len(base["passkey"][i[n]]) for n in lengths}
    out.append({"claim": "no scaling breaks past L: passkey accuracy at L is above every longer length's "
                         "(only meaningful if the base model retrieves at L)",
                "holds": all(passkey[f"none@{format_tokens(L)}"] > passkey[f"none@{format_tokens(n)}"] for n in longer),
                "measured": passkey})
    for factor in results["factors"]:
        target = L * factor
        if target not in i:
            continue
        t = i[target]
        pi_zs, pi_cpt = _zero_shot(results, "linear", factor), _row(results, "linear", factor, "cpt")
        if pi_zs and pi_cpt:
            out.append({"claim": f"x{factor}: PI degrades zero-shot (ppl at L above the base's) and recovers "
                                 f"after CPT (ppl at {format_tokens(target)} below its zero-shot value)",
                        "holds": pi_zs["ppl"][i[L]] > base_L and pi_cpt["ppl"][t] < pi_zs["ppl"][t],
                        "measured": {"base@L": base_L, "PI zero-shot@L": pi_zs["ppl"][i[L]],
                                     f"PI zero-shot@{format_tokens(target)}": pi_zs["ppl"][t],
                                     f"PI CPT@{format_tokens(target)}": pi_cpt["ppl"][t]}})
        for m in ("dynamic", "yarn"):
            zs = _zero_shot(results, m, factor)
            if zs and pi_zs:
                out.append({"claim": f"x{factor}: {NAMES[m]} is better zero-shot than PI (ppl at "
                                     f"{format_tokens(target)})",
                            "holds": zs["ppl"][t] < pi_zs["ppl"][t],
                            "measured": {f"{NAMES[m]}@{format_tokens(target)}": zs["ppl"][t],
                                         f"PI@{format_tokens(target)}": pi_zs["ppl"][t]}})
        yarn = _row(results, "yarn", factor, "cpt")
        far = [n for n in lengths if 4 * L <= n <= target]
        if yarn and far:
            out.append({"claim": f"x{factor}: YaRN + CPT reaches, at 4L-{format_tokens(target)}, a perplexity at most "
                                 "the base model's at L",
                        "holds": all(yarn["ppl"][i[n]] <= base_L for n in far),
                        "measured": {"base@L": base_L, **{f"YaRN CPT@{format_tokens(n)}": yarn["ppl"][i[n]] for n in far}}})
    return out


def _method_table(results, base_cells, cells_of) -> list[str]:
    """One row per (factor, method) after the base model's: zero-shot cells, then after-CPT cells."""
    lengths = results["lengths"]
    headers = (["method", "factor"] + [f"zero-shot {format_tokens(n)}" for n in lengths]
               + [f"CPT {format_tokens(n)}" for n in lengths])
    rows = [["base (trained at L)", "-", *base_cells, *["-"] * len(lengths)]]
    rows += [[NAMES[m], factor, *cells_of(_zero_shot(results, m, factor)), *cells_of(_row(results, m, factor, "cpt"))]
             for factor in results["factors"] for m in results["methods"]]
    return markdown_table(headers, rows, "lr" + "r" * 2 * len(lengths))


def markdown(results: dict) -> str:
    lengths = results["lengths"]
    lines = [] if results.get("complete", True) else [
        "**Partial**: the study was stopped before every model was evaluated; missing cells show '-'.", ""]
    lines += [f"Perplexity on the same held-out tokens at each length (base model trained at "
              f"L = {results['base_length']}); zero-shot -> after CPT at the target length.", ""]
    base = _row(results, "none", None, "base")

    def ppl(r):
        return [f"{p:.2f}" for p in r["ppl"]] if r else ["-"] * len(lengths)

    def acc(r):
        return [f"{sum(a) / len(a):.2f}" for a in r["passkey"]] if r else ["-"] * len(lengths)

    lines += _method_table(results, ppl(base), ppl)
    tokens = base["scored_tokens"]
    lines += ["", f"Scored tokens per length: {tokens[0]} (the same tokens at every length).", "",
              "Passkey accuracy (mean over depths " + ", ".join(f"{d:g}" for d in base["passkey_depths"])
              + f"; {base['passkey_trials']} keys per depth), zero-shot -> after CPT:", ""]
    lines += _method_table(results, acc(base), acc)
    lines += ["", "The literature's qualitative ordering, checked on these numbers:", ""]
    for c in results.get("checks", []):
        measured = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in c["measured"].items()
                             if not isinstance(v, dict))
        nested = "; ".join(f"{k}: " + ", ".join(f"{a} {b:.2f}" for a, b in v.items())
                           for k, v in c["measured"].items() if isinstance(v, dict))
        lines.append(f"- {'holds' if c['holds'] else 'DOES NOT hold'}: {c['claim']} ({measured or nested})")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    import matplotlib  # deferred: heavy plotting library, needed only for the PNG

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above, after choosing the Agg backend

    lengths, factors, methods = results["lengths"], results["factors"], results["methods"]
    colors = dict(zip(("none", "linear", "dynamic", "abf", "yarn", "llama3"), plt.cm.tab10.colors))
    base = _row(results, "none", None, "base")
    fig = plt.figure(figsize=(6 * len(factors), 10))
    grid = fig.add_gridspec(2, len(factors), height_ratios=[1, 1.2])
    for col, factor in enumerate(factors):
        ax = fig.add_subplot(grid[0, col])
        for m in methods:
            zs, cpt = _zero_shot(results, m, factor), _row(results, m, factor, "cpt")
            if zs:
                ax.plot(lengths, zs["ppl"], "--", marker="o", color=colors[m], alpha=0.8)
            if cpt:
                ax.plot(lengths, cpt["ppl"], "-", marker="s", color=colors[m], label=NAMES[m])
        ax.axhline(base["ppl"][0], color="grey", lw=0.8, ls=":", label="base @ L")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [format_tokens(n) for n in lengths])
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("perplexity (same tokens at every length)")
        ax.set_title(f"factor {factor} (CPT at {format_tokens(results['base_length'] * factor)}): "
                     "dashed zero-shot, solid after CPT")
        ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, :])
    labels, rows = ["base (none, zero-shot)"], [np.concatenate(base["passkey"])]
    for factor in factors:
        for m in methods:
            for stage in ("zero-shot", "cpt"):
                r = _zero_shot(results, m, factor) if stage == "zero-shot" else _row(results, m, factor, stage)
                if r is None or (stage == "zero-shot" and m == "none"):
                    continue
                labels.append(f"{NAMES[m]} x{factor} {stage}")
                rows.append(np.concatenate(r["passkey"]))
    depths = base["passkey_depths"]
    ax.imshow(np.array(rows), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xticks(range(len(lengths) * len(depths)),
                  [f"{format_tokens(n)}\n{d:g}" if j == 0 else f"{d:g}" for n in lengths for j, d in enumerate(depths)],
                  fontsize=6)
    for k in range(1, len(lengths)):
        ax.axvline(k * len(depths) - 0.5, color="white", lw=2)
    ax.set_title("passkey accuracy: columns = length (first label) x needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict, out) -> tuple[Path, Path, Path]:
    out = Path(out)
    results["checks"] = checks(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(markdown(results) + "\n")
    return out / "results.json", out / "table.md", plot(results, out / "study.png")
