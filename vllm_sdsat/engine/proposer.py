"""SDSAT proposer: the target model drafts its own next K tokens with adaptive tokens.

After each verification step, for every request whose last sampled token is t0 at position n and
that is to get k > 0 drafts, the target model runs once on `[t0, A_1, ..., A_{w-1}]` at positions
n..n+w-1, w the step's largest k (K, or fewer when vLLM's batch-size schedule or automatic K,
`patches/auto_k.py`, says so; requests with k = 0 skip the pass):
- the output at t0 is the exact next-token distribution, so draft 1 is always what the target says;
- the output at A_j is the fine-tuned adaptive slot's guess for the token j+1 steps ahead.
Greedy requests take argmaxes. Sampled requests sample every draft from the processed
(temperature/top-k/top-p) distribution q and hand q to vLLM's rejection sampler, which accepts with
min(1, p/q), so the output follows the target distribution exactly.

With `lookup: "ngram"` (hybrid drafting, `engine/lookup.py`) a row whose tokens end in an n-gram seen
before takes that lookup draft instead and skips the draft pass; `patches/draft_pass.py` makes the choice.

Cost: one extra target forward of w tokens per drafting request per step, no draft model, no draft KV cache.
The KV it writes lands in the request's own lookahead slots and is overwritten by the next
verification before anything reads it (see `patches/lookahead_slots.py`).
"""
import dataclasses

import torch
from vllm.config import VllmConfig
from vllm.v1.sample.metadata import SamplingMetadata

from vllm_sdsat.config import SdsatConfig
from vllm_sdsat.engine.draft_sampling import sample_drafts
from vllm_sdsat.engine.draft_stats import DraftStats


class SdsatProposer:
    def __init__(self, vllm_config: VllmConfig):
        spec = vllm_config.speculative_config
        model_config = vllm_config.model_config
        self.config = SdsatConfig.resolve(getattr(model_config.hf_config, "sdsat", None),
                                          {"num_speculative_tokens": spec.num_speculative_tokens},
                                          model_config.get_vocab_size(), source=str(model_config.model))
        self.k = self.config.num_speculative_tokens
        self.adaptive_ids = torch.tensor(self.config.adaptive_ids(self.k - 1), dtype=torch.long)
        # Hybrid drafting: rows whose tokens end in an n-gram seen before take a lookup draft of up to K.
        self.lookup = None
        if self.config.lookup != "none":
            from vllm_sdsat.engine.lookup import NgramLookup  # numba: not at plugin load (see engine/lookup.py)
            self.lookup = NgramLookup(
                self.config.prompt_lookup_min, self.config.prompt_lookup_max, self.k, model_config.max_model_len,
                vllm_config.scheduler_config.max_num_seqs)
        self.stats = DraftStats()

    def load_model(self, target_model) -> None:
        """vLLM offers the target model here; SDSAT drafts with it through the runner, loading nothing."""

    def propose(self, *args, **kwargs):
        raise RuntimeError("SdsatProposer.propose called without the vllm-sdsat runner hook; "
                           "is the vllm_sdsat plugin loaded in this process (VLLM_PLUGINS)?")

    def propose_from_target(self, target, common_attn_metadata, spec_decode_metadata, sampling: SamplingMetadata,
                            num_drafts: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Drafts for the batch rows with `num_drafts[i] > 0`, all as wide as the largest count, on the
        device: (rows [m] on the host, or None for all rows; drafts [m, width]; their probabilities
        [m, width, vocab] when any request samples, else None). Rows whose sample was discarded get
        drafts that the scheduler drops. No host sync."""
        width = min(max(num_drafts, default=0), self.k)
        t0, start, discarded = target.fresh_tokens(common_attn_metadata, spec_decode_metadata)
        rows = None
        if width and min(num_drafts) == 0:  # only the rows that draft run the draft pass
            rows = torch.tensor([i for i, k in enumerate(num_drafts) if k], dtype=torch.long)
            on_device = rows.to(t0.device, non_blocking=True)
            t0, start, discarded = t0[on_device], start[on_device], discarded[on_device]
            sampling = _rows_of(sampling, on_device)
        n = t0.shape[0]
        if not width:
            return rows, t0.new_empty((n, 0), dtype=torch.long), None
        if self.adaptive_ids.device != t0.device:  # once: a copy per step would sync with the device
            self.adaptive_ids = self.adaptive_ids.to(t0.device)
        input_ids = torch.cat([t0.to(self.adaptive_ids.dtype)[:, None],
                               self.adaptive_ids[:width - 1].expand(n, -1)], dim=1)
        positions = start[:, None] + torch.arange(width, device=start.device)
        logits = target.forward(common_attn_metadata, input_ids, positions, discarded, rows)  # [n*w, vocab]
        tokens, q = sample_drafts(logits, sampling, width)
        return rows, tokens.view(n, width), None if q is None else q.view(n, width, -1)


def _rows_of(sampling: SamplingMetadata, rows: torch.Tensor) -> SamplingMetadata:
    """The sampling settings the draft sampling reads, for a subset of the batch rows."""
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return dataclasses.replace(sampling, temperature=pick(sampling.temperature), top_k=pick(sampling.top_k),
                               top_p=pick(sampling.top_p))
