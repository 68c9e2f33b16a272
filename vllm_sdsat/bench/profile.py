"""`vllm-sdsat profile`: where the time of one engine step goes, per method and batch size.

How it measures. vLLM's model runner marks its phases with `record_function_or_nullcontext`
("gpu_model_runner: preprocess / forward / postprocess / sample / draft / bookkeep / ...",
`vllm/v1/utils.py`). Instead of the torch profiler, which records every aten op (microseconds each,
a large and uneven share of a few-ms step of a small model), a function sent to the worker with
`LLM.collective_rpc` points those scopes at a sink that stores (name, start, end) from
`time.perf_counter_ns`, about a microsecond per scope. The same sink times the worker's RPC handlers
(`execute_model`, `sample_tokens`, `take_draft_token_ids`) and, with forward hooks, the model calls
inside the drafter. An engine step runs from one `execute_model` to the next, so the components
tile the step's wall time: the runner's scopes, the rest of the handlers, the round trips between
handlers (the engine core's calls between them), and the worker's idle time until the next step (the engine core's update_from_output,
outputs to the driver and schedule; async scheduling overlaps it with the runner).

Counted: decode steps only (neither the step nor the next one schedules a new request), so prefills
and the idle time between `generate` calls are left out. Cost: one engine start per method (about
30-60 s on 2 cores) plus the generations; the default run (4 methods, batch 1 and 16, 8 prompts x 192
tokens, 3 repeats) takes about 10 minutes. It needs `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (set here)
to send the timing function to the worker.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from vllm_sdsat.bench.methods import NGRAM_LOOKUP
from vllm_sdsat.paths import EMBEDDED_MODEL, REPO

# Stacking order (bottom to top) and legend of the plot.
COMPONENTS = {
    "forward": "target forward (model compute)",
    "logits": "target logits (lm_head)",
    "draft_model": "drafter's model calls (model compute)",
    "draft_other": "drafter, rest (inputs, attention metadata, draft sampling, host copies)",
    "sample": "sampling / rejection sampling",
    "preprocess": "input preparation + attention metadata",
    "bookkeep": "bookkeeping (host sync, output lists)",
    "runner_other": "rest of the worker's step handlers",
    "wait_sample": "worker idle before sample_tokens (an engine core -> worker round trip)",
    "wait_take_draft": "worker idle before take_draft_token_ids (engine core: update_from_output + a round trip)",
    "engine_core": "worker idle until the next step (engine core: update, outputs, schedule)",
}
WAIT_COMPONENT = {"sample_tokens": "wait_sample", "take_draft_token_ids": "wait_take_draft"}
SCOPE_COMPONENT = {"preprocess": "preprocess", "forward": "forward", "postprocess": "logits",
                   "sample": "sample", "draft": "draft_other", "bookkeep": "bookkeep"}
SCOPE_PREFIX = "gpu_model_runner: "
HANDLERS = ("execute_model", "sample_tokens", "take_draft_token_ids")
MODEL_EVENTS = ("model", "compute_logits")  # nested in "draft": the drafter's model compute
DEFAULT_METHODS = "none,ngram:1,ngram:7,sdsat:7"

_EVENTS: list[tuple] = []  # in the worker process: (name, start_ns, end_ns, info or None)


# ---- in the worker (sent with LLM.collective_rpc) ----

def install_timers(worker) -> bool:
    """Point vLLM's profiling scopes at a timing sink and time the step handlers and model calls."""
    from contextlib import contextmanager

    import torch
    import vllm.v1.utils as vllm_utils

    clock, events = time.perf_counter_ns, _EVENTS

    @contextmanager
    def scope(name):
        start = clock()
        try:
            yield
        finally:
            events.append((name, start, clock(), None))

    def timed(name, fn, describe=None):
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                events.append((name, start, clock(), describe(*args) if describe else None))
        return wrapper

    def describe_step(scheduler_output):
        return {"tokens": scheduler_output.total_num_scheduled_tokens,
                "reqs": len(scheduler_output.num_scheduled_tokens),
                "new_reqs": len(scheduler_output.scheduled_new_reqs)}

    vllm_utils._PROFILER_FUNC = scope
    for name in HANDLERS:
        setattr(worker, name, timed(name, getattr(worker, name), describe_step if name == "execute_model" else None))
    model = worker.model_runner.model
    model.compute_logits = timed("compute_logits", model.compute_logits)
    if isinstance(model, torch.nn.Module):
        starts = []
        model.register_forward_pre_hook(lambda *_: starts.append(clock()))
        model.register_forward_hook(lambda *_: events.append(("model", starts.pop(), clock(), None)))
    return True


def take_events(worker) -> list[tuple]:
    events = list(_EVENTS)
    _EVENTS.clear()
    return events


# ---- aggregation (pure; tested on synthetic traces) ----

def _inside(inner, outer) -> bool:
    return outer[1] <= inner[1] and inner[2] <= outer[2] and inner is not outer


def step_breakdown(events: list[tuple]) -> list[dict]:
    """Per decode step, {component: ms} plus "total_ms" and the step's "reqs"/"tokens".

    A step runs from one `execute_model` (that schedules tokens) to the next; the last step, and
    steps that schedule a new request or are followed by one, are not counted."""
    events = sorted(events, key=lambda e: e[1])
    starts = [i for i, e in enumerate(events) if e[0] == "execute_model" and e[3] and e[3]["tokens"] > 0]
    steps = []
    for a, b in zip(starts, starts[1:]):
        info, next_info = events[a][3], events[b][3]
        if info["new_reqs"] or next_info["new_reqs"]:
            continue
        begin, end = events[a][1], events[b][1]
        window = [e for e in events[a:b] if e[2] <= end]
        handlers = [e for e in window if e[0] in HANDLERS]
        scopes = [e for e in window if e[0].startswith(SCOPE_PREFIX)]
        top = [s for s in scopes if not any(_inside(s, o) for o in scopes)]
        ms = dict.fromkeys(COMPONENTS, 0.0)
        for s in top:
            ms[SCOPE_COMPONENT.get(s[0].removeprefix(SCOPE_PREFIX), "runner_other")] += (s[2] - s[1]) / 1e6
        for d in (s for s in top if s[0] == SCOPE_PREFIX + "draft"):
            inner = [e for e in window if e[0] in MODEL_EVENTS and _inside(e, d)]
            model = sum(e[2] - e[1] for e in inner if not any(_inside(e, o) for o in inner)) / 1e6
            ms["draft_model"] += model
            ms["draft_other"] -= model
        handler_ms = sum(h[2] - h[1] for h in handlers) / 1e6
        ms["runner_other"] += handler_ms - sum((s[2] - s[1]) / 1e6 for s in top)
        for prev, h in zip(handlers, handlers[1:]):
            ms[WAIT_COMPONENT.get(h[0], "engine_core")] += (h[1] - prev[2]) / 1e6
        ms["engine_core"] += (end - handlers[-1][2]) / 1e6
        steps.append({**ms, "total_ms": (end - begin) / 1e6, "reqs": info["reqs"], "tokens": info["tokens"]})
    return steps


def summarize(steps: list[dict]) -> dict:
    """Mean ms per step of each component and of the total, over the counted steps."""
    if not steps:
        return {"steps": 0, "ms_per_step": None, "components_ms": dict.fromkeys(COMPONENTS)}
    n = len(steps)
    return {"steps": n, "ms_per_step": sum(s["total_ms"] for s in steps) / n,
            "mean_reqs": sum(s["reqs"] for s in steps) / n, "mean_scheduled_tokens": sum(s["tokens"] for s in steps) / n,
            "components_ms": {c: sum(s[c] for s in steps) / n for c in COMPONENTS}}


def parse_method(text: str) -> tuple[str, str, dict | None]:
    """"none" | "ngram:K" | "sdsat:K" | "sdsat:auto" | "sdsat:0" -> (label, method, speculative_config).

    "sdsat:0" is an SDSAT engine (K = 7, the embedded checkpoint's) whose batch-size schedule gives K = 0 at
    every size: each step is a plain step inside the speculative engine, which shows what its machinery
    costs when nothing is drafted."""
    method, _, k = text.strip().partition(":")
    if method == "none":
        return "none", "none", None
    if method == "sdsat" and k == "auto":
        return "sdsat K=auto", method, {"method": method}
    if method == "sdsat" and k == "0":
        return "sdsat K=0", method, {"method": method, "num_speculative_tokens": 7,
                                     "num_speculative_tokens_per_batch_size": [(1, 1 << 20, 0)]}
    if method not in ("ngram", "sdsat") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"bad method {text!r}: expected none, ngram:K, sdsat:K, sdsat:auto or sdsat:0")
    spec = {"method": method, "num_speculative_tokens": int(k), **(NGRAM_LOOKUP if method == "ngram" else {})}
    return f"{method} K={k}", method, spec


# ---- the run ----

def profile_cell(llm, prompts: list[str], batch: int, max_tokens: int, repeats: int) -> dict:
    """Warm up, then `repeats` timed generations of `prompts` in batches of `batch`; the repeat with the
    median ms per step is reported, all repeats are kept."""
    from vllm import SamplingParams

    from vllm_sdsat.bench.engine import acceptance, timed_generate
    from vllm_sdsat.bench.runner import spec_delta

    llm.generate(prompts[:batch], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    llm.collective_rpc(take_events)
    reps = []
    for _ in range(repeats):
        before = acceptance(llm)
        outputs, tok_s, _ = timed_generate(llm, prompts, SamplingParams(temperature=0, max_tokens=max_tokens), batch)
        steps = step_breakdown(llm.collective_rpc(take_events)[0])
        spec = spec_delta(before, acceptance(llm))
        reps.append({**summarize(steps), "tok_s": tok_s, "num_drafts": spec["num_drafts"],
                     "mean_accepted_length": spec["mean_accepted_length"],
                     "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)})
    best = sorted(reps, key=lambda r: r["ms_per_step"] or 0)[len(reps) // 2]
    return {**best, "repeats": reps}


def run_profile(opts: argparse.Namespace) -> dict:
    from vllm import LLM

    from vllm_sdsat.bench.engine import QUIET_VLLM_ENV, humaneval_prompts, shutdown
    from vllm_sdsat.bench.runner import machine_description
    from vllm_sdsat.console import console

    for key, value in {**QUIET_VLLM_ENV, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}.items():
        os.environ.setdefault(key, value)
    methods = [parse_method(m) for m in opts.methods.split(",")]
    prompts = humaneval_prompts(max(opts.prompts, max(opts.batch_sizes)))
    results = {"label": opts.label, "meta": {
        "command": opts.command_line, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine_description(), "model": str(opts.model), "dtype": opts.dtype,
        "max_tokens": opts.max_tokens, "prompts": opts.prompts, "repeats": opts.repeats,
        "enforce_eager": opts.enforce_eager}, "runs": []}
    bar = console.bar(total=len(methods) * len(opts.batch_sizes), desc="profile", unit="cell")
    for label, method, spec in methods:
        bar.set_postfix_str(f"{label}: starting engine")
        llm = LLM(model=str(opts.model), speculative_config=spec, dtype=opts.dtype, max_model_len=2048,
                  disable_log_stats=False, seed=0, enable_prefix_caching=False, enforce_eager=opts.enforce_eager)
        llm.collective_rpc(install_timers)
        async_scheduling = bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling)
        for batch in opts.batch_sizes:
            bar.set_postfix_str(f"{label} batch={batch}")
            cell = profile_cell(llm, prompts[:max(opts.prompts, batch)], batch, opts.max_tokens, opts.repeats)
            results["runs"].append({"method": label, "batch_size": batch, "speculative_config": spec,
                                    "async_scheduling": async_scheduling, **cell})
            bar.update()
        shutdown(llm)
        del llm
    bar.close()
    return results


# ---- outputs ----

def markdown_table(results: list[dict]) -> str:
    """One row per (label, method, batch size): ms per step by component, mean accepted length (AL)
    and output tokens/s of the reported repeat."""
    head = ["run", "batch", "ms/step", "AL", "tok/s", *COMPONENTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for r in res["runs"]:
            al = r["mean_accepted_length"] or 1.0  # tokens per request per step; 1 without drafts
            cells = [f"{res['label']}: {r['method']}", str(r["batch_size"]), f"{r['ms_per_step']:.2f}",
                     f"{al:.2f}", f"{r['tok_s']:.0f}",
                     *(f"{r['components_ms'][c]:.2f}" for c in COMPONENTS)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path:
    """Stacked bars of ms per step by component: one panel per batch size, one bar per (label, method)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for res in results for r in res["runs"]})
    width = max(4.5, 1.1 * max(sum(r["batch_size"] == b for res in results for r in res["runs"]) for b in batches))
    fig, axes = plt.subplots(1, len(batches), figsize=(width * len(batches), 7), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, batch in zip(axes[0], batches):
        runs = [(res["label"], r) for res in results for r in res["runs"] if r["batch_size"] == batch]
        names = [f"{r['method']}" + (f"\n{label}" if len(results) > 1 else "") for label, r in runs]
        bottom = [0.0] * len(runs)
        for color, (comp, desc) in zip(colors, COMPONENTS.items()):
            values = [r["components_ms"][comp] for _, r in runs]
            ax.bar(names, values, bottom=bottom, color=color, label=desc if batch == batches[0] else None)
            bottom = [b + v for b, v in zip(bottom, values)]
        for x, (_, r) in enumerate(runs):
            ax.text(x, bottom[x], f"{r['ms_per_step']:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("ms per engine step")
        ax.tick_params(axis="x", labelsize=8)
    fig.legend(loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.3, wspace=0.3)
    fig.suptitle("vLLM engine step breakdown (decode steps, greedy)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_cli(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--model", default=str(EMBEDDED_MODEL), help="target checkpoint (default: the embedded SDSAT model)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"none, ngram:K, sdsat:K, sdsat:auto, sdsat:0 (no drafts), comma-separated "
                                                              f"(default {DEFAULT_METHODS})")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    p.add_argument("--prompts", type=int, default=8, help="first N HumanEval prompts (default 8; at least the batch)")
    p.add_argument("--max-tokens", type=int, default=192, help="new tokens per request (default 192)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per cell; the median one is reported")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile")
    p.add_argument("--label", default="current", help="names this run (before/after); output profile_<label>.json")
    p.add_argument("--output", default=str(REPO / "runs" / "profile"), help="output folder (default runs/profile)")
    p.add_argument("--from-json", nargs="+", default=None,
                   help="no engine: combine these profile_<label>.json files into one table and plot")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from vllm_sdsat.console import console

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        results = [json.loads(Path(f).read_text()) for f in args.from_json]
        stem = "profile_" + "_vs_".join(r["label"] for r in results)
    else:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        [parse_method(m) for m in args.methods.split(",")]  # raises on a bad method before any engine starts
        args.command_line = " ".join(shlex.quote(a) for a in ["vllm-sdsat", *sys.argv[1:]])
        results = [run_profile(args)]
        stem = f"profile_{args.label}"
        (out / f"{stem}.json").write_text(json.dumps(results[0], indent=1) + "\n")
    table = markdown_table(results)
    (out / f"{stem}.md").write_text(table + "\n")
    png = plot(results, out / f"{stem}.png")
    console.print(table)
    console.print(f"wrote {out / f'{stem}.md'}, {png}" + ("" if args.from_json else f", {out / f'{stem}.json'}"))
    return 0
