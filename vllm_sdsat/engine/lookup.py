"""Lookup drafts for hybrid SDSAT (`lookup: "ngram"`): vLLM's own n-gram matcher over each request's tokens.

For each candidate row, vLLM's numba kernel (`batch_propose_numba`, `v1/spec_decode/ngram_proposer.py`, the
one vLLM's `ngram` method runs) finds the longest suffix of the request's tokens, `min_n`..`max_n` long, that
occurred earlier in them, and proposes the up to `k` tokens that followed it. A row with a match takes
that lookup draft; a row without one takes SDSAT's adaptive draft (`patches/draft_pass.py` decides).
A lookup draft is a point mass: the rejection sampler gets q = one-hot for it
(`engine/draft_sampling.py`, `one_hot_probs`).

Imported only when a proposer with a lookup is built (in the worker, after vLLM's start-up): at plugin
load time numba's objects would be in the modules vLLM's CPU platform scans for Triton kernels, which fails.

Cost: host-only, O(tokens of the candidate rows) per step, no device work; numba compiles the kernel
once per process (in `__init__`, about a second).
"""
import numpy as np
from numba import get_num_threads, set_num_threads
from vllm.v1.spec_decode.ngram_proposer import batch_propose_numba


class NgramLookup:
    def __init__(self, min_n: int, max_n: int, k: int, max_model_len: int, max_num_reqs: int):
        self.min_n, self.max_n, self.k, self.max_model_len = min_n, max_n, k, max_model_len
        self.drafts = np.zeros((max_num_reqs, k), dtype=np.int32)
        self.counts = np.zeros(max_num_reqs, dtype=np.int32)
        warm = np.arange(8, dtype=np.int32)[None].repeat(2, 0) % 2  # the types the runner's arrays have
        self.propose([0], np.full(2, 8, dtype=np.int32), warm)

    def propose(self, rows: list[int], num_tokens: np.ndarray, token_ids: np.ndarray) -> dict[int, list[int]]:
        """{row: lookup draft} for the `rows` (batch indices) whose tokens `token_ids[row, :num_tokens[row]]`
        end in an n-gram seen before in them; rows without a match are left out."""
        if not rows:
            return {}
        threads = get_num_threads()
        set_num_threads(1)  # as vLLM's NgramProposer below 8192 tokens (its cap is 1 thread anyway)
        try:
            batch_propose_numba(rows, num_tokens, token_ids, self.min_n, self.max_n, self.max_model_len, self.k,
                                self.drafts, self.counts)
        finally:
            set_num_threads(threads)
        return {r: self.drafts[r, :self.counts[r]].tolist() for r in rows if self.counts[r] > 0}

