"""Hook: a placeholder draft (-1) must be rejected in random sampling, never emitted as a token.

Written against vLLM 0.32 (`_rejection_random_sample` as called by `rejection_sample`,
`v1/sample/rejection_sampler.py`).

The scheduler pads drafts that fail a structured-output grammar with -1
(`v1/core/sched/scheduler.py`). vLLM 0.32's random-sampling kernels (the CPU C++ kernel, and the Triton
one likewise) read the probability of token -1, i.e. an entry of the previous row, and can accept it:
the output then holds -1 where a token sampled from the target belongs (found by vLLM's own
`test_placeholder_draft_token_rejected_random`, docs/vllm-rejection-sampler-tests.md). After the kernel,
for each random-sampling request whose drafts before its first placeholder were all accepted, this puts
the recovered token (a sample of the target) at the placeholder and ends the row there. Plain torch,
no host sync.
"""
import torch
from vllm.v1.sample import rejection_sampler

PLACEHOLDER = -1
_original = rejection_sampler._rejection_random_sample


def reject_placeholders(output_token_ids, cu_num_draft_tokens, draft_token_ids, recovered_token_ids, is_greedy,
                        max_spec_len: int) -> None:
    """In place on output_token_ids [batch, max_spec_len + 1]; see the module docstring."""
    batch, num_tokens = output_token_ids.shape[0], draft_token_ids.shape[0]
    device = output_token_ids.device
    cu = cu_num_draft_tokens.long()
    token = torch.arange(num_tokens, device=device)
    req = torch.searchsorted(cu, token, right=True)  # the request of each draft token
    pos = token - torch.cat([cu.new_zeros(1), cu[:-1]])[req]
    drafts = torch.full((batch, max_spec_len), -2, dtype=torch.long, device=device)
    recovered = torch.zeros((batch, max_spec_len), dtype=torch.long, device=device)
    drafts[req, pos] = draft_token_ids.long()
    recovered[req, pos] = recovered_token_ids.long()
    is_placeholder = drafts == PLACEHOLDER
    columns = torch.arange(max_spec_len, device=device)
    first = torch.where(is_placeholder.any(1), is_placeholder.int().argmax(1), max_spec_len)  # [batch]
    before = columns[None] < first[:, None]
    accepted_before = ((output_token_ids[:, :max_spec_len].long() == drafts) | ~before).all(1)
    fix = is_placeholder.any(1) & accepted_before
    if is_greedy is not None:
        fix &= ~is_greedy
    at = first.clamp(max=max_spec_len - 1)
    rows = torch.arange(batch, device=device)
    new_token = torch.where(fix, recovered[rows, at], output_token_ids[rows, at].long())
    output_token_ids[rows, at] = new_token.to(output_token_ids.dtype)
    after = torch.arange(max_spec_len + 1, device=device)[None] > first[:, None]
    output_token_ids.masked_fill_(after & fix[:, None], PLACEHOLDER)


class _RejectingPlaceholders:
    """vLLM's kernel launcher (its other attributes, e.g. register_warmup, pass through), fixed up after."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __call__(self, output_token_ids, cu_num_draft_tokens, draft_token_ids, draft_probs, target_probs,
                 bonus_token_ids, recovered_token_ids, uniform_probs, is_greedy, max_spec_len, *args, **kwargs):
        result = self.kernel(output_token_ids, cu_num_draft_tokens, draft_token_ids, draft_probs, target_probs,
                             bonus_token_ids, recovered_token_ids, uniform_probs, is_greedy, max_spec_len,
                             *args, **kwargs)
        if max_spec_len > 0 and draft_token_ids.numel():
            reject_placeholders(output_token_ids, cu_num_draft_tokens, draft_token_ids, recovered_token_ids,
                                is_greedy, max_spec_len)
        return result


_rejection_random_sample = _RejectingPlaceholders(_original)


def apply() -> None:
    if not isinstance(rejection_sampler._rejection_random_sample, _RejectingPlaceholders):
        rejection_sampler._rejection_random_sample = _rejection_random_sample
