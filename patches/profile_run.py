"""Hook: count the SDSAT draft pass in vLLM's memory profile.

Written against vLLM 0.32 (`GPUModelRunner.profile_run`, `v1/worker/gpu_model_runner.py`; the CPU runner
inherits it).

On GPU, vLLM sizes the KV cache from the peak memory of `profile_run` (`Worker.determine_available_memory`,
inside `memory_profiling`, before the KV cache exists). Its dummy forward, sampler and rejection sampler
runs exercise EAGLE and draft-model drafters, never SDSAT's draft pass, whose draft logits and q
[rows * K, vocab] reach gigabytes at large batch and vocabulary; the KV cache would take that memory.

So the profile run first runs the real proposer (`SdsatProposer.propose_from_target`: the chunked draft
forward, then draft sampling with q) on dummy rows, as many as a step can hold, all sampled with top-k and
top-p (vLLM's heaviest sampling path), while a tensor the size of that step's verification logits is live,
as it is in `sample_tokens`. q then stays live, as a step's q stays live through the next step's forward
and rejection sampling, through a rejection sampler run on the largest verification step (drafts filling
the token budget, with their q gathered as vLLM gathers it) and then vLLM's own profile run, whose dummy
rejection sampler run verifies one draft per request only. The dummy forward has no attention metadata
(like vLLM's dummy runs): attention is skipped and no KV is written.

On CPU, vLLM calls `profile_run` only to warm up compiled graphs (not under enforce_eager) and takes the KV
cache size from VLLM_CPU_KVCACHE_SPACE or the RSS after that warm-up, so there the hook adds warm-up only.
"""
import torch
from vllm.forward_context import set_forward_context
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_sdsat.patches.draft_pass import TargetDraftPass

_original = GPUModelRunner.profile_run


class DummyDraftPass(TargetDraftPass):
    """TargetDraftPass's chunked forward on `rows` dummy rows at positions 0..K-1, without a KV cache."""

    def __init__(self, runner: GPUModelRunner, rows: int):
        self.runner = runner
        self.max_tokens = runner.scheduler_config.max_num_batched_tokens
        self.rows = rows

    def fresh_tokens(self, common, spec):
        zeros = torch.zeros(self.rows, dtype=torch.long, device=self.runner.device)
        return zeros.int(), zeros, zeros.bool()

    def _forward_chunk(self, common, rows: slice, input_ids, positions, discarded):
        runner = self.runner
        with set_forward_context(None, runner.vllm_config, num_tokens=input_ids.numel()):
            hidden = runner.model(input_ids=input_ids.reshape(-1).to(torch.int32), positions=positions.reshape(-1),
                                  intermediate_tensors=None, inputs_embeds=None)
        # Skipped attention leaves garbage (NaN, inf) that could upset the sampling kernels; vLLM's dummy
        # sampler run takes random hidden states for the same reason.
        return runner.model.compute_logits(torch.rand_like(hidden))


def dummy_sampling(rows: int, vocab: int, device) -> SamplingMetadata:
    """Every row sampled at T=0.5 with top-k and top-p, the values of vLLM's own dummy sampler run."""
    full = lambda v: torch.full((rows,), v, device=device)  # noqa: E731
    return SamplingMetadata(
        temperature=full(0.5), all_greedy=False, all_random=False, top_p=full(0.9), top_k=full(vocab - 1),
        generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=full(0.0), presence_penalties=full(0.0), repetition_penalties=full(1.0),
        output_token_ids=[[] for _ in range(rows)], allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=LogitsProcessors())


def full_verification(runner: GPUModelRunner, q: torch.Tensor) -> None:
    """The rejection sampler on the step with the most drafts to verify: as few requests as can fill the
    token budget with K drafts each, their draft probabilities gathered from q (a copy, as
    `_get_spec_decode_draft_probs` makes). The sampler's temporaries grow with the drafts."""
    rows, k, vocab = q.shape
    budget = runner.max_num_tokens
    requests = min(rows, -(-budget // (k + 1)))
    drafts = min(requests * k, budget - requests)
    if drafts <= 0:
        return
    counts = [drafts // requests + (i < drafts % requests) for i in range(requests)]
    draft_probs = torch.cat([q[i, :n] for i, n in enumerate(counts)])
    # The step's hidden states, and those gathered at the sampled positions, stay live through sampling.
    hidden = torch.empty(2, budget, runner.model_config.get_hidden_size(), dtype=runner.model_config.dtype,
                         device=runner.device)
    logits = torch.randn(drafts + requests, vocab, dtype=runner.model_config.dtype, device=runner.device)
    runner.rejection_sampler(SpecDecodeMetadata.make_dummy([[0] * n for n in counts], runner.device),
                             draft_probs, logits, dummy_sampling(requests, vocab, runner.device))
    del hidden


def profile_run(self: GPUModelRunner, *args, **kwargs) -> None:
    from vllm_sdsat.engine.proposer import SdsatProposer

    drafter = getattr(self, "drafter", None)
    if not isinstance(drafter, SdsatProposer):
        return _original(self, *args, **kwargs)
    rows = min(self.max_num_reqs, self.max_num_tokens)  # a row schedules at least one token
    vocab = self.model_config.get_vocab_size()
    with torch.inference_mode():
        verify_logits = torch.empty(min(rows * (drafter.k + 1), self.max_num_tokens), vocab,
                                    dtype=self.model_config.dtype, device=self.device)
        _, _, q = drafter.propose_from_target(DummyDraftPass(self, rows), None, None,
                                              dummy_sampling(rows, vocab, self.device), [drafter.k] * rows)
        del verify_logits
        full_verification(self, q)
        self._sync_device()
    try:
        return _original(self, *args, **kwargs)
    finally:
        del q


def apply() -> None:
    GPUModelRunner.profile_run = profile_run
