"""Any speculative configs side by side at fixed concurrency: served engines (one engine core process
each, as `vllm-sdsat bench` runs them), all up at once, each repeat going round them, HumanEval
prompts with the bench's `--concurrent` workload. For what the bench's method list cannot say, such as
hybrid drafting with other n-gram lengths, or one hook left out (`--env`). The first config is the
baseline of the ratios.

    python examples/compare_engines.py --concurrency 1 '{}' \\
        '{"method": "ngram", "num_speculative_tokens": 7, "prompt_lookup_min": 2, "prompt_lookup_max": 4}' \\
        '{"method": "sdsat", "lookup": "ngram"}' '{"method": "sdsat", "lookup": "ngram", "prompt_lookup_min": 2}'
    python examples/compare_engines.py '{}' '{"method": "sdsat"}' '{"method": "sdsat"}' \\
        --env 2:VLLM_SDSAT_SKIP_PATCHES=one_call_steps
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vllm_sdsat.bench.engine import QUIET_VLLM_ENV, generate_at_concurrency, humaneval_prompts  # noqa: E402
from vllm_sdsat.bench.runner import cell_workload  # noqa: E402
from vllm_sdsat.paths import EMBEDDED_MODEL  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="speculative configs as JSON ('{}': no speculation)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=str(EMBEDDED_MODEL))
    p.add_argument("--env", action="append", default=[], metavar="I:NAME=VALUE",
                   help="an environment variable for the engine processes of config I (0-based) alone")
    args = p.parse_args()
    os.environ.update(QUIET_VLLM_ENV)
    from vllm import LLM, SamplingParams

    engine_env = {}  # config index -> ["NAME=VALUE", ...]
    for item in args.env:
        index, assignment = item.split(":", 1)
        engine_env.setdefault(int(index), []).append(assignment)
    llms = []
    for i, config in enumerate(args.configs):
        # The engine core and its workers inherit the environment when spawned.
        with mock.patch.dict(os.environ, dict(a.split("=", 1) for a in engine_env.get(i, []))):
            llms.append(LLM(model=args.model, speculative_config=json.loads(config) or None, dtype="bfloat16",
                            max_model_len=2048, seed=0, enable_prefix_caching=False))
    sampling = {"temperature": args.temperature, "top_p": 0.95 if args.temperature else 1.0}
    requests, params = cell_workload(humaneval_prompts(args.prompts), args.concurrency, args.max_tokens, sampling,
                                     concurrent=True)
    for llm in llms:  # untimed warm-up, as the bench's
        llm.generate(requests[:args.concurrency], SamplingParams(max_tokens=8, **sampling), use_tqdm=False)
    tok_s = [[] for _ in llms]
    for _ in range(args.repeats):
        for llm, runs in zip(llms, tok_s):
            start = time.perf_counter()
            outputs = generate_at_concurrency(llm, requests, params, args.concurrency)
            runs.append(sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start))
    base = statistics.median(tok_s[0])
    for i, (config, runs) in enumerate(zip(args.configs, tok_s)):
        median = statistics.median(runs)
        label = " ".join([config, *engine_env.get(i, [])])
        print(f"{label:100s} {median:7.0f} tok/s  {median / base:.2f}x  [{' '.join(f'{r:.0f}' for r in runs)}]")


if __name__ == "__main__":
    main()
