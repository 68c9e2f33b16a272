"""Draft sampling for the SDSAT proposer, in bounded memory.

Greedy batches take the argmax of the draft logits. Otherwise each draft row is processed the way vLLM's
rejection sampler processes the target logits (temperature, then top-k/top-p with vLLM's own helpers),
q = softmax of that, one token is drawn from q, and greedy rows of a mixed batch take their argmax.

Memory: q [rows, vocab] fp32 is the output, which the rejection sampler needs whole. Everything else is
done a chunk of rows at a time, in place inside that chunk of q. A chunk holds at most CHUNK_ELEMENTS
logits (32 MiB as fp32); its largest temporaries are those of vLLM's top-p path (sorted values, their
int64 indices, the sorted softmax, two masks) and then the exponential noise, about 4.5 chunks in all:
under 160 MiB whatever the batch (tests/test_draft_memory.py measures it).

Lookup drafts (hybrid drafting) are point masses: `one_hot_probs` gives their q.
"""
import torch
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
from vllm.v1.sample.sampler import Sampler

CHUNK_ELEMENTS = 1 << 23
_SAMPLING_EPS = 1e-5  # vLLM's threshold below which a temperature means greedy


def sample_drafts(logits: torch.Tensor, sampling: SamplingMetadata, k: int,
                  chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft tokens [rows] and q [rows, vocab] fp32 (None when every request is greedy) for draft
    logits [rows, vocab] whose row r belongs to request r // k. `logits` is left unchanged.
    Costs q plus the temporaries of one chunk (module docstring)."""
    if sampling.all_greedy:
        return logits.argmax(-1), None
    rows, vocab = logits.shape
    per_slot = lambda t: None if t is None else t.repeat_interleave(k)  # noqa: E731
    temperature, top_k, top_p = per_slot(sampling.temperature), per_slot(sampling.top_k), per_slot(sampling.top_p)
    q = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    step = max(1, chunk_elements // vocab)
    for s in range(0, rows, step):
        r = slice(s, s + step)
        tokens[r] = _sample_chunk(logits[r], q[r], temperature[r], None if top_k is None else top_k[r],
                                  None if top_p is None else top_p[r], sampling.all_random)
    return tokens, q


def _sample_chunk(logits, q, temperature, top_k, top_p, all_random: bool) -> torch.Tensor:
    q.copy_(logits)
    Sampler.apply_temperature(q, temperature, all_random)  # in place; greedy rows divide by 1
    processed = apply_top_k_top_p(q, top_k, top_p)  # in place on vLLM's paths; a copy is allowed
    if processed is not q:
        q.copy_(processed)
    del processed
    # Softmax in place: no second chunk-sized tensor.
    q.sub_(q.amax(-1, keepdim=True)).exp_()
    q.div_(q.sum(-1, keepdim=True))
    noise = torch.empty_like(q).exponential_()
    sampled = torch.div(q, noise, out=noise).argmax(-1)  # one draw from q (exponential race)
    if all_random:
        return sampled
    return torch.where(temperature < _SAMPLING_EPS, logits.argmax(-1), sampled)


def one_hot_probs(drafts: list[list[int]], width: int, vocab: int, device) -> torch.Tensor:
    """q [rows, width, vocab] fp32 with a point mass on each draft token (zeros past a row's draft).
    Costs the whole tensor, zero-filled."""
    q = torch.zeros(len(drafts), width, vocab, dtype=torch.float32, device=device)
    rows = [i for i, d in enumerate(drafts) for _ in d]
    slots = [j for d in drafts for j in range(len(d))]
    tokens = [t for d in drafts for t in d]
    q[rows, slots, tokens] = 1.0
    return q
