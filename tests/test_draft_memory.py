"""Draft-pass memory: bounded draft sampling, the draft pass in vLLM's memory profile, the chunked draft pass.

Peaks are bytes allocated through torch's CPU allocator, read from torch.profiler(profile_memory=True):
exact and deterministic on CPU, unlike RSS.
"""
import gc
import os
import re

import pytest
import torch
from scipy.stats import chisquare

from test_vllm import PROMPTS, SDSAT_MODEL, make_llm

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p  # noqa: E402

from vllm_sdsat.engine.draft_sampling import CHUNK_ELEMENTS, NUCLEUS_CANDIDATES, sample_drafts  # noqa: E402
from vllm_sdsat.patches.profile_run import dummy_sampling  # noqa: E402


def allocated_peak(fn) -> tuple[int, object]:
    """Peak CPU bytes allocated while fn() runs, over what was allocated when it started; and fn's result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return profiled_peak(prof), result


def profiled_peak(prof) -> int:
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort()
    return max(total for _, _, total in events) - (events[0][2] - events[0][1])


def sampling(temperature, top_k=None, top_p=None):
    """SamplingMetadata for len(temperature) requests (0 = greedy)."""
    t = torch.tensor(temperature, dtype=torch.float32)
    meta = dummy_sampling(len(temperature), 2, "cpu")
    greedy = t < 1e-5
    meta.temperature, meta.top_k, meta.top_p = t, top_k, top_p
    meta.all_greedy, meta.all_random = bool(greedy.all()), not bool(greedy.any())
    return meta


def previous_sample(logits, meta, k):
    """The draft sampling as it was before draft_sampling.py: whole-batch temporaries."""
    per_slot = lambda t: None if t is None else t.repeat_interleave(k)  # noqa: E731
    temperature = per_slot(meta.temperature)
    greedy = temperature < 1e-5
    processed = logits / torch.where(greedy, 1.0, temperature).unsqueeze(-1)
    q = apply_top_k_top_p(processed, per_slot(meta.top_k), per_slot(meta.top_p)).softmax(-1)
    return greedy, logits.argmax(-1), q


N, K, VOCAB = 9, 3, 64


@pytest.mark.parametrize("top_k, top_p", [(None, None), (torch.tensor([5, 64, 1, 20, 7, 64, 3, 9, 64]), None),
                                          (None, torch.full((N,), 0.8)),
                                          (torch.tensor([5, 64, 1, 20, 7, 64, 3, 9, 64]), torch.full((N,), 0.7))])
@pytest.mark.parametrize("chunk_rows", [1, 4, 27, 100])  # 4 splits requests across chunks
def test_draft_sampling_matches_the_whole_batch_version(top_k, top_p, chunk_rows):
    torch.manual_seed(0)
    logits = torch.randn(N * K, VOCAB) * 3
    before = logits.clone()
    meta = sampling([0.0, 0.7, 1.0, 0.0, 1.5, 0.3, 1.0, 0.0, 0.9], top_k, top_p)
    tokens, q = sample_drafts(logits, meta, K, chunk_elements=chunk_rows * VOCAB)
    greedy, argmax, expected_q = previous_sample(logits, meta, K)
    assert torch.equal(logits, before)
    torch.testing.assert_close(q, expected_q, rtol=1e-5, atol=1e-6)
    assert torch.equal(tokens[greedy], argmax[greedy])
    assert (q[torch.arange(N * K), tokens] > 0).all(), "a sampled draft outside q's support"


def test_all_greedy_takes_the_argmax():
    logits = torch.randn(N * K, VOCAB)
    tokens, q = sample_drafts(logits, sampling([0.0] * N), K)
    assert q is None and torch.equal(tokens, logits.argmax(-1))


def test_draws_follow_q():
    """20,000 rows of one distribution, drawn in chunks of 300 rows: the counts fit q (chi-square)."""
    torch.manual_seed(1)
    rows, k = 20_000, 4
    logits = (torch.randn(VOCAB) * 2).expand(rows, VOCAB).contiguous()
    tokens, q = sample_drafts(logits, sampling([1.0] * (rows // k), top_k=torch.full((rows // k,), 12)), k,
                              chunk_elements=300 * VOCAB)
    support = q[0] > 0
    assert support.sum() == 12 and support[tokens].all()
    observed = torch.bincount(tokens, minlength=VOCAB)[support].double()
    assert chisquare(observed, q[0][support].double() * rows).pvalue > 1e-3


def test_nucleus_within_the_candidates_is_vllms_and_a_wider_one_keeps_the_whole_distribution():
    """At a vocabulary wider than the candidates searched: peaked rows get exactly vLLM's top-k/top-p q;
    flat rows, whose nucleus reaches past the candidates, keep their whole (top-k) distribution, a
    superset of vLLM's support (lossless, since drafts are drawn from this q)."""
    torch.manual_seed(2)
    vocab, k = 4 * NUCLEUS_CANDIDATES, 2
    peaked = torch.randn(6, vocab) * 8
    flat = torch.randn(4, vocab) * 0.1
    logits = torch.cat([peaked, flat])
    top_k = torch.tensor([vocab, 3, vocab, vocab, vocab])
    meta = sampling([1.0, 0.7, 0.5, 1.0, 1.0], top_k, torch.tensor([0.9, 0.5, 0.95, 0.9, 0.99]))
    tokens, q = sample_drafts(logits, meta, k)
    _, _, vllm_q = previous_sample(logits, meta, k)
    assert ((vllm_q[:6] > 0).sum(-1) < NUCLEUS_CANDIDATES).all()  # the peaked rows' nuclei are narrow
    torch.testing.assert_close(q[:6], vllm_q[:6], rtol=1e-5, atol=1e-6)
    assert ((vllm_q[6:] > 0).sum(-1) > NUCLEUS_CANDIDATES).all()  # the flat rows' are not
    torch.testing.assert_close(q[6:], (flat / 1.0).softmax(-1), rtol=1e-5, atol=1e-6)
    assert (q[torch.arange(len(q)), tokens] > 0).all()


@pytest.mark.parametrize("rows", [512, 2048])
def test_sampling_temporaries_stay_within_the_chunk_budget(rows):
    """At a 32k vocabulary with top-k and top-p: beyond q itself, the peak stays under the 160 MiB the
    module documents, whatever the batch. The whole-batch version needs over 4x q on top of q."""
    torch.manual_seed(0)
    vocab, k = 32_000, 4
    logits = torch.randn(rows, vocab)
    meta = sampling([0.0] + [0.8] * (rows // k - 1), torch.full((rows // k,), 50), torch.full((rows // k,), 0.9))
    q_bytes = rows * vocab * 4
    assert q_bytes > CHUNK_ELEMENTS * 4  # several chunks
    peak, _ = allocated_peak(lambda: sample_drafts(logits, meta, k))
    assert peak - q_bytes < 160 * 2**20
    previous, _ = allocated_peak(lambda: previous_sample(logits, meta, k))
    assert previous - q_bytes > 4 * q_bytes


# --- engines ---------------------------------------------------------------------------------------

# A step's draft pass runs in chunks when it drafts for more than BUDGET // SPEC_K = 5 rows. Decode steps
# hold at most 4 (4 x 7 tokens fit in 32), prefill steps of the two-token prompts up to 16.
BUDGET, MAX_SEQS, SPEC_K = 32, 16, 6
SAMPLED = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, ignore_eos=True)
GREEDY = SamplingParams(max_tokens=48, temperature=0)


def short_prompts():
    """32 two-token prompts ("def" and the start of a HumanEval function name): up to 16 prefill in one
    step, so prefill steps draft for many rows."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SDSAT_MODEL)
    names = [re.search(r"def \w+", p).group(0) for p in PROMPTS]
    return [{"prompt_token_ids": tok(n, add_special_tokens=False).input_ids[:2]} for n in names]


def profile_peaks(worker):
    """On a worker: peak bytes of the runner's profile run (hooked, unless skipped) and of vLLM's own."""
    from vllm_sdsat.patches import profile_run
    runner = worker.model_runner
    return allocated_peak(runner.profile_run)[0], allocated_peak(lambda: profile_run._original(runner))[0]


def start_recording(worker, memory: bool):
    """On a worker: record the rows of every real draft pass (and whether it made q), and with `memory`
    profile allocations from now on."""
    drafter = worker.model_runner.drafter
    original, rows = drafter.propose_from_target, []

    def propose_from_target(*args):
        drafting, drafts, q = original(*args)
        rows.append((drafts.shape[0], q is not None))
        return drafting, drafts, q

    drafter.propose_from_target, drafter.draft_rows = propose_from_target, rows
    worker.memory_profiler = None
    if memory:
        worker.memory_profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                        profile_memory=True)
        worker.memory_profiler.__enter__()


def stop_recording(worker):
    """On a worker: the draft rows recorded since start_recording, and the peak bytes (None without memory)."""
    drafter = worker.model_runner.drafter
    del drafter.propose_from_target  # the class's method again
    if worker.memory_profiler is None:
        return drafter.draft_rows, None
    worker.memory_profiler.__exit__(None, None, None)
    return drafter.draft_rows, profiled_peak(worker.memory_profiler)


def sdsat_llm(**kwargs):
    return make_llm({"method": "sdsat", "num_speculative_tokens": SPEC_K}, max_model_len=512,
                    max_num_batched_tokens=BUDGET, max_num_seqs=MAX_SEQS, **kwargs)


@pytest.fixture(scope="module")
def chunked():
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    llm = sdsat_llm()
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def plain_short():
    llm = make_llm(None, max_model_len=512)
    outs = llm.generate(short_prompts(), GREEDY, use_tqdm=False)
    del llm
    gc.collect()
    return [list(o.outputs[0].token_ids) for o in outs]


def mismatches(expected, outs) -> list[int]:
    return [i for i, (a, o) in enumerate(zip(expected, outs)) if a != list(o.outputs[0].token_ids)]


def test_profile_run_covers_a_real_draft_pass(chunked):
    """vLLM's profile run (which sizes the KV cache on GPU) must peak at least as high as real steps whose
    draft passes sample q in chunks (more draft tokens than max_num_batched_tokens), and those sampled
    requests complete. vLLM's own profile run peaks lower here (the setup check), so the test fails
    without patches/profile_run.py (VLLM_SDSAT_SKIP_PATCHES=profile_run).

    The real peak is in the rejection sampler of the step with the most drafts, while the previous step's
    q is live; the hook replays that step's tensors at their largest, so it matches the worst real step to
    within the small per-step metadata (bytes to a few KiB): 1% slack. Which steps the scheduler forms
    depends on timing, so a run may or may not hit the worst case."""
    (hooked, own), = chunked.collective_rpc(profile_peaks)
    chunked.collective_rpc(start_recording, args=(True,))
    outs = chunked.generate(short_prompts(), SAMPLED, use_tqdm=False)
    (rows, real), = chunked.collective_rpc(stop_recording)
    assert all(len(o.outputs[0].token_ids) == SAMPLED.max_tokens for o in outs)
    assert max(n for n, with_q in rows if with_q) * SPEC_K > BUDGET, f"no draft pass with q chunked: {rows}"
    assert own < real, f"vLLM's own profile run ({own} B) already covers the real steps ({real} B): setup broken"
    print("PEAKS", hooked, real, own, rows)
    assert hooked >= 0.99 * real, f"profile run peak {hooked} B < real steps' {real} B (vLLM's own: {own} B)"


def test_chunked_draft_pass_greedy_equals_plain(chunked, plain_short):
    """num_reqs x K > max_num_batched_tokens, so the draft forward runs in chunks; greedy output is that of
    decoding without speculation."""
    chunked.collective_rpc(start_recording, args=(False,))
    outs = chunked.generate(short_prompts(), GREEDY, use_tqdm=False)
    (rows, _), = chunked.collective_rpc(stop_recording)
    assert max(n for n, _ in rows) * SPEC_K > BUDGET, f"no draft pass chunked: {rows}"
    assert not mismatches(plain_short, outs), "prompts differ from decoding without speculation"


def test_profile_run_before_the_kv_cache_exists(plain_short):
    """With compilation on, the CPU worker warms up with vLLM's profile run before it allocates the KV
    cache, which is when the GPU worker profiles: the hook's draft pass then has no KV cache to use. The
    engine starts, and decodes greedy as without speculation."""
    from vllm.config import CompilationMode
    llm = sdsat_llm(enforce_eager=False,
                    compilation_config={"mode": CompilationMode.DYNAMO_TRACE_ONCE, "backend": "eager"})
    outs = llm.generate(short_prompts()[:8], GREEDY, use_tqdm=False)
    del llm
    gc.collect()
    assert not mismatches(plain_short[:8], outs)
