"""Where automatic K gains and loses: one SDSAT engine with automatic K, in this process, through the
benchmark's cells (static batches of HumanEval prompts, or with --concurrent requests in flight, each
cell after an untimed 8-token warm-up).

For every timed step, automatic K's own bookkeeping is read (`SizeClass.observe`): the tokens the step
made, and what plain decoding would have made in its time by the class's fit of its own plain steps.
Per cell and repeat it prints tokens/s and, per batch class and mode, gained (+) or lost (-) tokens:
warm-up steps, drafting and lookup runs, and probes show apart. Steps not timed (prefills) are left
out. One engine in one process, so tokens/s are not comparable across runs of this script; the
gains are (they are ratios within the run).

    python examples/auto_k_trace.py --temperatures 0,1.0 --batch-sizes 1,16,64
"""
import argparse
import collections
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vllm_sdsat.bench.engine import QUIET_VLLM_ENV, humaneval_prompts, timed_generate  # noqa: E402
from vllm_sdsat.bench.cli import load_prompts_file  # noqa: E402
from vllm_sdsat.bench.runner import cell_workload  # noqa: E402


def trace_size_classes(gains: dict) -> None:
    """Wrap `SizeClass.observe` to add each timed step to gains[(batch class, counted mode)] =
    [steps, ms, tokens made, plain-equivalent tokens]."""
    from vllm_sdsat.engine import auto_k, step_cost

    observe = auto_k.SizeClass.observe

    def traced(self, requests, verified, drafted, verifying, mode, verified_mode, made, seconds):
        if self.plain.steps >= 2 and made is not None:  # None: not counted by automatic K either
            a, b, _ = self.plain.coefficients()
            warm_up = self.cost.steps < step_cost.WARMUP_STEPS
            counted = (verified_mode if verifying else mode) + (" (warm-up)" if warm_up else "")
            row = gains[(requests.bit_length(), counted)]
            row[0] += 1
            row[1] += seconds * 1e3
            row[2] += made if verifying or mode != auto_k.PLAIN else requests
            row[3] += seconds * 1e3 * requests / (a + b * requests)
        return observe(self, requests, verified, drafted, verifying, mode, verified_mode, made, seconds)

    auto_k.SizeClass.observe = traced


def trace_drafts(drafts: collections.Counter) -> None:
    """Wrap `AutoK.plan` to count how many drafts it gives each request in steps that draft."""
    from vllm_sdsat.engine import auto_k

    plan = auto_k.AutoK.plan

    def traced(self, *args, **kwargs):
        counts = plan(self, *args, **kwargs)
        if self.mode in (auto_k.HYBRID, auto_k.DRAFTING):
            drafts.update(counts)
        return counts

    auto_k.AutoK.plan = traced


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "examples" / "models" / "sdsat-tiny-code"))
    p.add_argument("--speculative-config", default='{"method": "sdsat"}', help="JSON (default: automatic K)")
    p.add_argument("--temperatures", default="0,1.0")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompts-file", help="a JSON list of prompts instead of HumanEval's (as the bench's)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--concurrent", action="store_true", help="batch size = requests in flight (bench --concurrent)")
    opts = p.parse_args()
    os.environ.update(QUIET_VLLM_ENV | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})  # the controller lives here

    from vllm import LLM, SamplingParams

    gains = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    drafts = collections.Counter()
    trace_size_classes(gains)
    trace_drafts(drafts)
    llm = LLM(model=opts.model, speculative_config=json.loads(opts.speculative_config), dtype="bfloat16",
              max_model_len=2048, seed=0, enable_prefix_caching=False)
    prompts = (load_prompts_file(opts.prompts_file)[:opts.prompts] if opts.prompts_file
               else humaneval_prompts(opts.prompts))
    for temperature in map(float, opts.temperatures.split(",")):
        for batch in map(int, opts.batch_sizes.split(",")):
            sampling = dict(temperature=temperature, top_p=0.95 if temperature else 1.0)
            requests, params = cell_workload(prompts, batch, opts.max_tokens, sampling, opts.concurrent)
            llm.generate(requests[:batch], SamplingParams(max_tokens=8, temperature=temperature), use_tqdm=False)
            for repeat in range(opts.repeats):
                gains.clear()
                drafts.clear()
                outputs, tokens_per_s, _ = timed_generate(llm, requests, params, batch, concurrent=opts.concurrent)
                tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
                net = sum(made - plain for (_, mode), (_, _, made, plain) in gains.items() if not mode.startswith("plain"))
                print(f"T={temperature} batch {batch} repeat {repeat}: {tokens_per_s:.0f} tokens/s; "
                      f"{net:+.0f} tokens against plain steps, of {tokens}")
                if drafts:
                    total = sum(drafts.values())
                    print("    drafts per request in drafting steps: "
                          + ", ".join(f"{k}: {n / total:.0%}" for k, n in sorted(drafts.items())))
                for (size_class, mode), (steps, ms, made, plain) in sorted(gains.items()):
                    if not mode.startswith("plain"):
                        print(f"    {2 ** (size_class - 1)}-{2 ** size_class - 1} requests, {mode}: {steps} steps, "
                              f"{ms:.0f} ms, {made:.0f} tokens against {plain:.0f} plain: {made - plain:+.0f}")


if __name__ == "__main__":
    main()
