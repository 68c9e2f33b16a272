"""Hook: top-k on an empty batch of draft positions.

Written against vLLM 0.32 (`apply_top_k_top_p` as imported by `v1/sample/rejection_sampler.py`).

With speculative decoding on, vLLM runs the rejection sampler on every step, also on steps where no
request has drafts (a step of prefills). Its top-k path then calls `k.max()` on an empty tensor and
the engine dies for any request with top_k set. An empty batch has nothing to mask.
"""
from vllm.v1.sample import rejection_sampler

_original = rejection_sampler.apply_top_k_top_p


def apply_top_k_top_p(logits, k, p, *args, **kwargs):
    if logits.shape[0] == 0:
        return logits
    return _original(logits, k, p, *args, **kwargs)


def apply() -> None:
    rejection_sampler.apply_top_k_top_p = apply_top_k_top_p
