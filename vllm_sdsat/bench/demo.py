"""`vllm-sdsat demo`: SDSAT vs plain vLLM decoding on the embedded tiny code model.

Runs HumanEval prompts one at a time (batch 1, greedy), first without speculation, then with SDSAT,
and prints tokens/s, the speedup, mean accepted length and whether the outputs are identical.
"""
import os
from contextlib import ExitStack
from pathlib import Path

from vllm_sdsat.bench.engine import QUIET_VLLM_ENV, acceptance, humaneval_prompts, running_engine, timed_generate
from vllm_sdsat.config import SdsatConfig
from vllm_sdsat.console import console
from vllm_sdsat.paths import EMBEDDED_MODEL


def run(model: str, k: int | None, n_prompts: int, max_tokens: int, dtype: str) -> dict:
    from vllm import SamplingParams

    cfg = SdsatConfig.from_pretrained(model, num_speculative_tokens=k)
    prompts = humaneval_prompts(n_prompts)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    results = {}
    k_desc = f"K={cfg.num_speculative_tokens}" if k else f"K auto (at most {cfg.num_speculative_tokens})"
    for name, spec in (("plain", None), ("sdsat", {"method": "sdsat", "num_speculative_tokens": k or "auto"})):
        with ExitStack() as engine:  # one engine at a time, shut down when the block ends
            with console.waiting(f"{name:5s}: starting engine"):
                llm = engine.enter_context(running_engine(model=model, speculative_config=spec, dtype=dtype,
                                                          max_model_len=2048, disable_log_stats=False, seed=0))
                llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
            with console.bar(total=len(prompts), desc=f"{name:5s}: generating", unit="prompt") as bar:
                outputs, tok_s, _ = timed_generate(llm, prompts, params, bar=bar)
            results[name] = {"tok_s": tok_s, "ids": [o.outputs[0].token_ids for o in outputs], **acceptance(llm)}
    plain, sdsat = results["plain"], results["sdsat"]
    same = sum(list(a) == list(b) for a, b in zip(plain["ids"], sdsat["ids"]))
    console.print(f"\nSDSAT demo: {Path(model).name}, {len(prompts)} HumanEval prompts, batch 1, greedy, "
                  f"{max_tokens} new tokens, {dtype}, {k_desc}")
    console.print(f"  plain vLLM : {plain['tok_s']:7.1f} tok/s")
    console.print(f"  SDSAT      : {sdsat['tok_s']:7.1f} tok/s   mean accepted length "
                  f"{sdsat['mean_accepted_length']:.2f}")
    console.print(f"  speedup    : {sdsat['tok_s'] / plain['tok_s']:.2f}x   identical outputs: {same}/{len(prompts)}")
    return results


def add_cli(parser):
    parser.add_argument("--model", default=str(EMBEDDED_MODEL), help="SDSAT checkpoint (default: embedded tiny model)")
    parser.add_argument("--k", type=int, default=None, help="a fixed K drafts per step (default: auto, at most the checkpoint's K)")
    parser.add_argument("--prompts", type=int, default=16, help="number of HumanEval prompts")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {args.model} (expected a Hugging Face folder with config.json)")
    for key, value in QUIET_VLLM_ENV.items():
        os.environ.setdefault(key, value)
    run(args.model, args.k, args.prompts, args.max_tokens, args.dtype)
    return 0
