"""Where the engine's time goes, by kind of step: plain decoding and SDSAT with automatic K, in this
process, side by side, at fixed concurrency (the bench's --concurrent load).

Each engine step is timed (`EngineCore.step`) and put in one of four kinds: decode-only or with a
prefill, and verifying drafts or not. Per repeat and engine it prints steps, ms per step, and the ms of
each step spent in the scheduler (`schedule` and `update_from_output`, where automatic K runs).
Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so everything shares the CPU with the
model's threads: absolute times differ from a served engine's, ratios within one run do not.

    python examples/step_kinds.py --concurrency 16 --temperature 0
    python examples/step_kinds.py --concurrency 16 --temperature 0 --same-length
"""
import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vllm_sdsat.bench.engine import QUIET_VLLM_ENV, humaneval_prompts, timed_generate  # noqa: E402
from vllm_sdsat.bench.runner import cell_workload  # noqa: E402


def record_steps(log: list) -> None:
    """Wrap `EngineCore.step` to append (engine tag, kind, seconds, scheduler seconds) per step that ran."""
    from vllm.v1.engine.core import EngineCore

    step = EngineCore.step

    def timed(self):
        scheduler, seen = self.scheduler, {"scheduler_s": 0.0}

        def clocked(fn, keep=False):
            def call(*args, **kwargs):
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                seen["scheduler_s"] += time.perf_counter() - start
                if keep:
                    seen["output"] = result
                return result
            return call

        scheduler.schedule = clocked(scheduler.schedule, keep=True)
        scheduler.update_from_output = clocked(scheduler.update_from_output)
        start = time.perf_counter()
        try:
            return step(self)
        finally:
            seconds = time.perf_counter() - start
            del scheduler.schedule, scheduler.update_from_output  # the class's methods again
            out = seen.get("output")
            if out is not None and out.total_num_scheduled_tokens:
                drafts = out.scheduled_spec_decode_tokens
                prefill = any(n > 1 + len(drafts.get(r, [])) for r, n in out.num_scheduled_tokens.items())
                kind = ("prefill" if prefill else "decode") + (" + verify" if drafts else "")
                log.append((self.sdsat_tag, kind, seconds, seen["scheduler_s"]))

    EngineCore.step = timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "examples" / "models" / "sdsat-tiny-code"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--same-length", action="store_true", help="every request max-tokens long (no spread)")
    p.add_argument("--repeats", type=int, default=3)
    opts = p.parse_args()
    os.environ.update(QUIET_VLLM_ENV | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})  # the engine core lives here

    from vllm import LLM, SamplingParams

    log: list = []
    record_steps(log)
    engines = {}
    for tag, spec in (("none", None), ("sdsat auto", {"method": "sdsat"})):
        engines[tag] = LLM(model=opts.model, speculative_config=spec, dtype="bfloat16", max_model_len=2048, seed=0,
                           enable_prefix_caching=False)
        engines[tag].llm_engine.engine_core.engine_core.sdsat_tag = tag
    prompts = humaneval_prompts(32)
    sampling = dict(temperature=opts.temperature, top_p=0.95 if opts.temperature else 1.0)
    requests, params = cell_workload(prompts, opts.concurrency, opts.max_tokens, sampling, concurrent=True)
    if opts.same_length:
        params = SamplingParams(max_tokens=opts.max_tokens, **sampling)
    for llm in engines.values():
        llm.generate(requests[:opts.concurrency], SamplingParams(max_tokens=8, **sampling), use_tqdm=False)
    for repeat in range(opts.repeats):
        for tag, llm in engines.items():
            log.clear()
            _, tokens_per_s, _ = timed_generate(llm, requests, params, opts.concurrency, concurrent=True)
            kinds = collections.defaultdict(lambda: [0, 0.0, 0.0])
            for _, kind, seconds, scheduler_s in log:
                row = kinds[kind]
                row[0], row[1], row[2] = row[0] + 1, row[1] + seconds, row[2] + scheduler_s
            print(f"repeat {repeat} {tag}: {tokens_per_s:.0f} tokens/s, {len(log)} steps, "
                  f"{sum(s for _, _, s, _ in log) * 1e3:.0f} ms")
            for kind, (steps, seconds, scheduler_s) in sorted(kinds.items()):
                print(f"    {kind}: {steps} steps, {seconds / steps * 1e3:.2f} ms each "
                      f"({scheduler_s / steps * 1e3:.3f} ms in the scheduler)")


if __name__ == "__main__":
    main()
