"""Hook: per-request sampling parameters expanded to draft positions, on the CPU platform.

Written against vLLM 0.32 (`expand_batch_to_tokens`, `v1/sample/rejection_sampler.py`, and its CPU
kernel `_expand_kernel_impl` in `utils/cpu_triton_utils.py`).

The CPU kernel converts its output buffer with `_ensure_int64(output)`, which copies any tensor
that is not int64. For temperature (float32) and top-k (int32) the kernel writes into that copy and
the rejection sampler reads the untouched, uninitialised buffer. The target probabilities at draft
positions are then computed with garbage temperatures and top-k, so speculative *sampling* on CPU
does not follow the target distribution (greedy is unaffected), for every speculative method.
This replaces the expansion with plain torch on CPU.
"""
import torch
from vllm.platforms import current_platform
from vllm.v1.sample import rejection_sampler


def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    x = torch.where(x == replace_from, torch.as_tensor(replace_to, dtype=x.dtype), x)
    return x.repeat_interleave(counts, output_size=num_tokens)


def apply() -> None:
    if current_platform.is_cpu():
        rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
