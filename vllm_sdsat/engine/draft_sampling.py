"""Draft sampling for the SDSAT proposer, in bounded memory.

Greedy batches take the argmax of the draft logits. Otherwise each draft row is processed the way vLLM's
rejection sampler processes the target logits (temperature, then top-k, then top-p), q = softmax of
that, one token is drawn from q, and greedy rows of a mixed batch take their argmax.

Any q keeps the rejection sampler lossless, as long as the draft is drawn from that q; a q near the
target's processed distribution is what makes drafts accepted. That frees the draft side from vLLM's
top-p path, which sorts every row of the vocabulary, and from its exponential-race draw: on 2 CPU cores,
with them, draft sampling took 54 ms of a 114 ms drafting step (32 requests x 7 drafts, T = 1.0, top-p
0.95; vocabulary 4096). Here the
nucleus is found among each row's NUCLEUS_CANDIDATES largest logits (`torch.topk`), exactly vLLM's
top-k/top-p set whenever it lies within them (ties at its edge kept); a row whose nucleus is wider keeps
its whole (top-k) distribution. The draw is by inverse CDF: one uniform number per row. 6 ms at that
size.

Memory: q [rows, vocab] fp32 is the output, which the rejection sampler needs whole. Everything else is
done a chunk of rows at a time, in place inside that chunk of q. A chunk holds at most CHUNK_ELEMENTS
logits (32 MiB as fp32); its largest temporaries are a mask and the CDF, about 1.5 chunks: under 160 MiB
whatever the batch (tests/test_draft_memory.py measures it).

Lookup drafts (hybrid drafting) are point masses: `one_hot_probs` gives their q.
"""
import torch
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.sampler import Sampler

CHUNK_ELEMENTS = 1 << 23
NUCLEUS_CANDIDATES = 128  # logits per row searched for the top-k/top-p nucleus
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
    if top_k is not None or top_p is not None:
        q.masked_fill_(q < _nucleus_floor(q, top_k, top_p), float("-inf"))
    # Softmax in place: no second chunk-sized tensor.
    q.sub_(q.amax(-1, keepdim=True)).exp_()
    q.div_(q.sum(-1, keepdim=True))
    cdf = q.cumsum(-1)
    sampled = torch.searchsorted(cdf, torch.rand(len(q), 1, device=q.device) * cdf[:, -1:], right=True)
    sampled = sampled.squeeze(1).clamp_(max=q.shape[-1] - 1)  # right=True skips tokens of zero probability
    if all_random:
        return sampled
    return torch.where(temperature < _SAMPLING_EPS, logits.argmax(-1), sampled)


def _nucleus_floor(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """[rows, 1]: the smallest logit that vLLM's top-k and then top-p keep in each row (top-p over the
    top-k renormalised distribution), found among the row's largest logits; -inf where the nucleus may
    reach past them."""
    m = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    values = logits.topk(m, dim=-1).values  # descending
    probs = (values - logits.logsumexp(-1, keepdim=True)).exp_()
    keep = torch.ones_like(values, dtype=torch.bool)
    mass = torch.ones(len(values), 1, device=values.device)  # of the top-k set
    beyond = torch.ones(len(values), dtype=torch.bool, device=values.device)  # top-k reaches past m
    if top_k is not None:
        k = top_k.to(torch.long).clamp(1, m)
        keep = values >= values.gather(1, (k - 1).unsqueeze(1))
        beyond = top_k > m
        probs = probs * keep
        mass = torch.where(beyond.unsqueeze(1), mass, probs.sum(-1, keepdim=True))
    if top_p is not None:
        keep &= probs.cumsum(-1) - probs < top_p.unsqueeze(1) * mass  # the mass ranked above it is under p
    floor = values.gather(1, keep.sum(-1, keepdim=True) - 1)
    return torch.where((keep[:, -1] & beyond).unsqueeze(1), float("-inf"), floor)


def one_hot_probs(drafts: list[list[int]], width: int, vocab: int, device) -> torch.Tensor:
    """q [rows, width, vocab] fp32 with a point mass on each draft token (zeros past a row's draft).
    Costs the whole tensor, zero-filled."""
    q = torch.zeros(len(drafts), width, vocab, dtype=torch.float32, device=device)
    rows = [i for i, d in enumerate(drafts) for _ in d]
    slots = [j for d in drafts for j in range(len(d))]
    tokens = [t for d in drafts for t in d]
    q[rows, slots, tokens] = 1.0
    return q
