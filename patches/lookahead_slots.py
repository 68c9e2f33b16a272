"""Hook: reserve K lookahead KV slots per request for the SDSAT draft pass.

Written against vLLM 0.32 (`VllmConfig.num_lookahead_tokens`, `config/vllm.py`).

After a step whose last sampled token t0 sits at position n, the draft pass writes KV for
[t0, A x (K-1)] at positions n..n+K-1 into the request's own blocks. The scheduler allocated blocks
up to n-1 plus the lookahead, so the lookahead must be K (as for draft models). These slots are the
ones the next verification [t0, d1..dK] overwrites, so no KV capacity is spent on drafting.
"""
from vllm.config import VllmConfig

from vllm_sdsat.patches.speculative_config import is_sdsat

_original = VllmConfig.num_lookahead_tokens


def num_lookahead_tokens(self: VllmConfig) -> int:
    if is_sdsat(self.speculative_config):
        return self.speculative_config.num_speculative_tokens
    return _original.fget(self)


def apply() -> None:
    VllmConfig.num_lookahead_tokens = property(num_lookahead_tokens)
