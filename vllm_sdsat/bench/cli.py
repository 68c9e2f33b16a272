"""`vllm-sdsat bench`: options, the validated plan, and the run."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from vllm_sdsat.bench.engine import QUIET_VLLM_ENV
from vllm_sdsat.bench.methods import METHODS, EngineSpec, build_specs, int_or_auto, parse_list, parse_methods
from vllm_sdsat.bench.report import PREFIX, write_markdown, write_outputs
from vllm_sdsat.bench.runner import add_speedups, run_bench, run_meta
from vllm_sdsat.bench.suffix import SUFFIX_DIR_NAME, build_suffix_decoding
from vllm_sdsat.config import SdsatConfig, SdsatConfigError
from vllm_sdsat.console import console
from vllm_sdsat.paths import BASE_MODEL, CACHE_DIR, DRAFTER_MODEL, EMBEDDED_MODEL, REPO

DEFAULTS = dict(methods="none,sdsat,ngram,suffix,draft_model,pard", k=None, baseline_k=None,
                batch_sizes="1,4,16,64", sampling_batch_sizes=None, temperatures="0,0.2,1.0",
                prompts=164, max_tokens=256, repeats=3)

QUICK = dict(methods="none,sdsat,ngram", k=None, baseline_k=None, batch_sizes="1,4", sampling_batch_sizes=None,
             temperatures="0", prompts=8, max_tokens=128, repeats=1)


def add_cli(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--model", default=str(EMBEDDED_MODEL), help="target checkpoint (default: the embedded SDSAT model)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (hybrid: sdsat with lookup 'ngram'; default: all "
                        "but hybrid; --quick: none,sdsat,ngram)")
    p.add_argument("--k", default=None, help="SDSAT K values, comma-separated, 'auto' for automatic K (default: "
                                             "2..L+1 of the checkpoint; --quick: the checkpoint's K)")
    p.add_argument("--baseline-k", default=None, help="K for ngram/draft_model/pard, comma-separated "
                                                      "(default: the checkpoint's K; suffix picks its own)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,16,64; --quick 1,4)")
    p.add_argument("--sampling-batch-sizes", default=None, help="batch sizes for T>0 (default: --batch-sizes)")
    p.add_argument("--temperatures", default=None, help="comma-separated, 0 = greedy (default 0,0.2,1.0; --quick 0)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p when sampling (default 0.95)")
    p.add_argument("--prompts", type=int, default=None, help="first N HumanEval prompts (default 164; --quick 8)")
    p.add_argument("--prompts-file", default=None,
                   help="a JSON list of prompt strings to run instead of HumanEval's (the first --prompts of them), "
                        "e.g. held-out code from examples/tiny_model/heldout_prompts.py")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 256; --quick 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per cell (default 3; --quick 1)")
    p.add_argument("--interleave", action="store_true",
                   help="run all engines side by side, each repeat of a cell going round them all: ratios that "
                        "hold on a machine whose speed drifts (more memory: every engine is up at once)")
    p.add_argument("--concurrent", action="store_true",
                   help="batch size B means B requests in flight, each finished one replaced by the next (a server "
                        "at concurrency B), over max(prompts, 4B) requests whose lengths spread over [max-tokens / 2, "
                        "max-tokens]; default: static batches of B prompts")
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
    opts.k = parse_list(opts.k, int_or_auto, "--k") or None
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
    if opts.prompts_file:
        opts.prompt_texts = load_prompts_file(opts.prompts_file)
        opts.prompts = min(opts.prompts, len(opts.prompt_texts))
    if (opts.prompts > 164 and not opts.prompts_file) or not 1 <= opts.accuracy_problems <= 164:
        raise ValueError(f"HumanEval has 164 prompts; --prompts {opts.prompts} / --accuracy-problems "
                         f"{opts.accuracy_problems} must be in 1..164")
    if not 0 < opts.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {opts.top_p}")
    return opts


def load_prompts_file(path: str) -> list[str]:
    """The prompts of --prompts-file, or a ValueError that says what is wrong with the file."""
    try:
        prompts = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--prompts-file {path}: {e}") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"--prompts-file {path} must hold a JSON list of non-empty strings")
    return prompts


def plan(opts: argparse.Namespace) -> tuple[list[EngineSpec], dict]:
    """Validate the whole run and build the engine specs; never starts an engine."""
    if not (Path(opts.model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {opts.model} (expected a Hugging Face folder with config.json)")
    ks = opts.k
    if ks == "checkpoint":
        ks = None
        if "sdsat" in opts.methods or "hybrid" in opts.methods:
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
                console.print(f)
            return 0
        opts = resolve_options(args)
        if args.build_suffix:
            console.print(f"built {build_suffix_decoding()}")
        opts.command_line = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
        specs, skipped = ([], {}) if args.accuracy_only else plan(opts)
        if args.accuracy or args.accuracy_only:
            from vllm_sdsat.bench.humaneval import check_models
            check_models(opts.base_model, opts.model)
    except (SdsatConfigError, FileNotFoundError, ValueError, subprocess.CalledProcessError) as e:
        console.error(f"vllm-sdsat bench: error: {e}", show_log=False)
        return 2
    for key, value in QUIET_VLLM_ENV.items():
        os.environ.setdefault(key, value)
    if any(s.method == "hybrid" for s in specs):  # drafts by kind come from the workers (collective_rpc)
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    for method, why in skipped.items():
        console.print(f"vllm-sdsat bench: skipping {method}: {why}")
    opts.partial_json = out_dir / f"{PREFIX}results.partial.json"
    results = run_bench(opts, specs, skipped) if specs else {"meta": run_meta(opts, specs, opts.prompts), "runs": []}
    if args.accuracy or args.accuracy_only:
        from vllm_sdsat.bench.humaneval import pass_at_1_report
        results["accuracy"] = pass_at_1_report(opts.base_model, opts.model, n_problems=opts.accuracy_problems,
                                               max_tokens=opts.max_tokens, dtype=opts.dtype,
                                               max_model_len=opts.max_model_len)
    files = write_outputs(results, out_dir)
    opts.partial_json.unlink(missing_ok=True)
    console.print(write_markdown(results))
    console.print("wrote " + ", ".join(str(f) for f in files))
    return 0
