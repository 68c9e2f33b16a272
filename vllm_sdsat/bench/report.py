"""Markdown tables and PNG plots from a benchmark's results (the JSON that `run_bench` writes)."""
from __future__ import annotations

import json
from pathlib import Path

from vllm_sdsat.bench.engine import acceptance_rates
from vllm_sdsat.bench.methods import METHODS

PREFIX = "bench_"  # output files: bench_results.json, bench_results.md, bench_*.png

MAX_POSITIONS_SHOWN = 8  # suffix decoding drafts up to 24 tokens; the table shows the first few positions


def _fmt(x, spec="{:.2f}", none="-"):
    return none if x is None else spec.format(x)


def rate_after_first(spec: dict) -> float | None:
    """Acceptance rate over drafts 2..K; derived from the counters for results written before it was stored."""
    if spec.get("acceptance_rate_after_first") is not None or "num_drafts" not in spec:
        return spec.get("acceptance_rate_after_first")
    return acceptance_rates(spec["num_drafts"], spec.get("num_draft_tokens") or 0, spec.get("num_accepted_tokens") or 0,
                            spec.get("num_accepted_tokens_per_pos") or [])["acceptance_rate_after_first"]


def write_markdown(results: dict) -> str:
    """Markdown tables (one per temperature) from a results dict (the JSON that `run_bench` writes)."""
    meta, runs = results.get("meta", {}), results.get("runs", [])
    out = []
    if meta:
        workload = "HumanEval prompts" if meta.get("workload", "HumanEval").startswith("HumanEval") else meta["workload"]
        out.append(f"Model `{meta.get('model')}`, {meta.get('prompts')} {workload}, {meta.get('max_tokens')} "
                   f"new tokens, {meta.get('dtype')}, {meta.get('repeats')} repeat(s) per cell; "
                   f"machine: {meta.get('machine')}.")
        if meta.get("command"):
            out.append(f"\nCommand: `{meta['command']}`")
    load = "concurrency" if meta.get("load") == "concurrent" else "batch"
    for temperature in sorted({r["temperature"] for r in runs}):
        rows = [r for r in runs if r["temperature"] == temperature]
        top_p = rows[0].get("top_p", 1.0)
        out.append(f"\n### {'Greedy' if temperature == 0 else f'T = {temperature}, top-p = {top_p}'}\n")
        greedy = temperature == 0
        head = ["method", load, "tok/s median [min-max]", "speedup [min-max]", "mean acc. len", "acc. rate",
                "acc. rate drafts 2..K", "acc. rate per position", "TTFT ms", "peak RSS MiB", "KV tokens"]
        head += ["= none"] if greedy else []
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in sorted(rows, key=lambda r: (r["batch_size"], METHODS.index(r["method"]) if r["method"] in METHODS
                                             else 99, r.get("k") or 0)):
            t, s, spec = r["tok_s"], r.get("speedup"), r.get("spec") or {}
            rates = spec.get("acceptance_rate_per_pos") or []
            per_pos = " ".join(f"{a:.2f}" for a in rates[:MAX_POSITIONS_SHOWN])
            per_pos += f" ...({len(rates)})" if len(rates) > MAX_POSITIONS_SHOWN else ""
            cells = [r["label"], str(r["batch_size"]),
                     f"{_fmt(t['median'], '{:.1f}')} [{_fmt(t['min'], '{:.1f}')}-{_fmt(t['max'], '{:.1f}')}]",
                     (f"{_fmt(s['median'])}x [{_fmt(s['min'])}-{_fmt(s['max'])}]" if s else "-"),
                     _fmt(spec.get("mean_accepted_length")), _fmt(spec.get("acceptance_rate")),
                     _fmt(rate_after_first(spec)), per_pos or "-",
                     _fmt((r.get("ttft_ms") or {}).get("median"), "{:.0f}"), _fmt(r.get("peak_rss_mib"), "{:.0f}"),
                     _fmt(r.get("kv_capacity_tokens"), "{:,}")]
            if greedy:
                ident = r.get("identical_to_none")
                cells.append("ref" if r["method"] == "none" else
                             ("-" if ident is None else f"{ident}/{r.get('requests')}"))
            out.append("| " + " | ".join(cells) + " |")
    if runs:
        out.append("\nacc. rate = accepted / drafted over drafts 1..K; acc. rate drafts 2..K leaves out draft 1, "
                   "which for SDSAT is the target's own next token (always accepted when greedy), so it is the rate "
                   "of SDSAT's adaptive drafts alone.")
    hybrid = [r for r in runs if r.get("drafts_by_kind")]
    if hybrid:
        out.append("\n### Hybrid drafting: drafts by kind\n")
        out.append("| method | T | batch | lookup drafts | lookup acc. rate | adaptive drafts | adaptive acc. rate | "
                   "steps lookup / adaptive / mixed | draft passes |")
        out.append("|" + "---|" * 9)
        for r in hybrid:
            d = r["drafts_by_kind"]
            look, adapt, steps = d["kinds"]["lookup"], d["kinds"]["adaptive"], d["steps"]
            out.append(f"| {r['label']} | {r['temperature']} | {r['batch_size']} | {look['drafts']} | "
                       f"{_fmt(look['acceptance_rate'])} | {adapt['drafts']} | {_fmt(adapt['acceptance_rate'])} | "
                       f"{steps['lookup']} / {steps['adaptive']} / {steps['mixed']} | {d['draft_passes']} |")
    if results.get("skipped"):
        out.append("\nNot run:\n")
        out += [f"- `{m}`: {why}" for m, why in results["skipped"].items()]
    acc = results.get("accuracy")
    if acc:
        out.append("\n### HumanEval pass@1 (greedy)\n")
        if acc.get("harness"):
            out.append(f"Harness: {acc['harness']}.\n")
        out.append("| model | decoding | problems | passed | pass@1 | completions = plain decoding |")
        out.append("|---|---|---|---|---|---|")
        for row in acc.get("models", []):
            same = row.get("identical_to_plain")
            same = "-" if same is None else f"{same}/{row['problems']}"
            out.append(f"| `{Path(row['model']).name}` | {row['decoding']} | {row['problems']} | {row['passed']} | "
                       f"{row['pass_at_1']:.3f} | {same} |")
    return "\n".join(out) + "\n"


def plot(results: dict, out_dir: Path) -> list[Path]:
    """PNGs: acceptance vs K and tokens/s vs K (paper Figs. 3-4 style), speedup per method and batch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, files = results.get("runs", []), []
    temps = sorted({r["temperature"] for r in runs})
    batches = sorted({r["batch_size"] for r in runs})
    colors = {"sdsat": "C3", "hybrid": "C5", "ngram": "C0", "suffix": "C2", "draft_model": "C1", "pard": "C4",
              "none": "k"}
    markers = {"ngram": "s", "suffix": "D", "draft_model": "^", "pard": "v"}
    b0 = batches[0] if batches else 1

    def k_of(r):  # methods without a fixed K (suffix) are drawn as horizontal lines
        return r["k"]

    # Fig. 3 style: acceptance (overall rate and mean accepted length) vs K, smallest batch, per temperature.
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    for ti, t in enumerate(temps):
        rows = [r for r in runs if r["temperature"] == t and r["batch_size"] == b0 and r.get("spec")]
        style = ["-", "--", ":", "-."][ti % 4]
        for m in METHODS[1:]:
            for r in (r for r in rows if r["method"] == m and k_of(r) is None):
                for ax, key in zip(axes, ("acceptance_rate", "mean_accepted_length")):
                    if r["spec"][key] is not None:
                        ax.axhline(r["spec"][key], color=colors[m], ls=style, lw=1,
                                   label=f"{r['label']} T={t} (K dynamic)")
            pts = sorted((k_of(r), r["spec"]) for r in rows if r["method"] == m and k_of(r))
            if not pts:
                continue
            ks = [p[0] for p in pts]
            for ax, key in zip(axes, ("acceptance_rate", "mean_accepted_length")):
                ys = [p[1][key] for p in pts]
                if m == "sdsat":
                    ax.plot(ks, ys, style, marker="o", color=colors[m], label=f"{m} T={t}")
                else:
                    ax.scatter(ks, ys, marker=markers.get(m, "x"), color=colors[m], alpha=[1, 0.6, 0.35][ti % 3],
                               label=f"{m} T={t}")
    axes[0].set(xlabel="K (draft tokens per step)", ylabel="acceptance rate (accepted / drafted)",
                title=f"Acceptance rate vs K (batch {b0})")
    axes[1].set(xlabel="K (draft tokens per step)", ylabel="mean accepted length (tokens per step)",
                title=f"Mean accepted length vs K (batch {b0})")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    files.append(out_dir / f"{PREFIX}acceptance_vs_k.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # Fig. 4 style: tokens/s vs K, one panel per batch size, greedy (first temperature).
    t = temps[0] if temps else 0
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = [r for r in runs if r["temperature"] == t and r["batch_size"] == b]
        none = next((r for r in rows if r["method"] == "none"), None)
        if none:
            ax.axhline(none["tok_s"]["median"], color="k", ls="--", lw=1, label="none")
        for m in METHODS[1:]:
            for r in (r for r in rows if r["method"] == m and k_of(r) is None):
                ax.axhline(r["tok_s"]["median"], color=colors[m], lw=1, label=f"{r['label']} (K dynamic)")
            pts = sorted((k_of(r), r["tok_s"]) for r in rows if r["method"] == m and k_of(r))
            if not pts:
                continue
            ks, med = [p[0] for p in pts], [p[1]["median"] for p in pts]
            err = [[p[1]["median"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["median"] for p in pts]]
            if m == "sdsat":
                ax.errorbar(ks, med, yerr=err, marker="o", color=colors[m], label=m, capsize=3)
            else:
                ax.errorbar(ks, med, yerr=err, marker=markers.get(m, "x"), color=colors[m], ls="none", label=m,
                            capsize=3)
        ax.set(title=f"batch {b}", xlabel="K (draft tokens per step)", ylabel="output tokens/s")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Tokens/s vs K ({'greedy' if t == 0 else f'T={t}'})")
    fig.tight_layout()
    files.append(out_dir / f"{PREFIX}tokens_per_s_vs_k.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # Speedup over none per method/K and batch size, one panel per temperature.
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    for ax, t in zip(axes[0], temps):
        rows = [r for r in runs if r["temperature"] == t and r["method"] != "none" and r.get("speedup")]
        labels = sorted({r["label"] for r in rows}, key=lambda lab: (
            METHODS.index(lab.split()[0]) if lab.split()[0] in METHODS else 99, lab))
        bs = sorted({r["batch_size"] for r in rows})
        width = 0.8 / max(1, len(bs))
        for j, b in enumerate(bs):
            xs, ys, lo, hi = [], [], [], []
            for i, lab in enumerate(labels):
                r = next((r for r in rows if r["label"] == lab and r["batch_size"] == b), None)
                if r:
                    s = r["speedup"]
                    xs.append(i + (j - (len(bs) - 1) / 2) * width)
                    ys.append(s["median"])
                    lo.append(s["median"] - s["min"])
                    hi.append(s["max"] - s["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=f"batch {b}")
        ax.axhline(1, color="k", lw=1)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set(ylabel="speedup over no speculation", title="greedy" if t == 0 else f"T={t}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out_dir / f"{PREFIX}speedup.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # Acceptance rate per draft position, smallest batch, greedy.
    rows = [r for r in runs if r["temperature"] == t and r["batch_size"] == b0 and r.get("spec")
            and (r["spec"].get("acceptance_rate_per_pos"))]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            rates = r["spec"]["acceptance_rate_per_pos"]
            ax.plot(range(1, len(rates) + 1), rates, marker=markers.get(r["method"], "o"),
                    color=colors.get(r["method"]), alpha=0.4 + 0.6 * (r["method"] == "sdsat"), label=r["label"])
        ax.set(xlabel="draft position", ylabel="P(accepted at this position)", ylim=(0, 1.05),
               title=f"Acceptance per position (batch {b0}, {'greedy' if t == 0 else f'T={t}'})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(out_dir / f"{PREFIX}acceptance_per_position.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / f"{PREFIX}results.json", out_dir / f"{PREFIX}results.md"]
    files[0].write_text(json.dumps(results, indent=1) + "\n")
    files[1].write_text(write_markdown(results))
    if results.get("runs"):
        files += plot(results, out_dir)
    return files
