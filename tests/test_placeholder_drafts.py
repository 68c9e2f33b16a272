"""patches/placeholder_drafts.py: a placeholder draft (-1, a draft the grammar rejected) is never emitted as a
token in random sampling. Runs vLLM's rejection sampler in-process, no engine."""
from unittest.mock import Mock

import pytest
import torch

vllm = pytest.importorskip("vllm")
from vllm.platforms import current_platform  # noqa: E402
from vllm.v1.sample import rejection_sampler as rs  # noqa: E402
from vllm.v1.sample.logits_processor import LogitsProcessors  # noqa: E402
from vllm.v1.sample.metadata import SamplingMetadata  # noqa: E402
from vllm.v1.sample.sampler import Sampler, SamplerOutput  # noqa: E402
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata  # noqa: E402

from vllm_sdsat.patches import cpu_expand_tokens, placeholder_drafts  # noqa: E402

VOCAB = 50
DEVICE = current_platform.device_type


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    current_platform.register_triton_kernel_overrides()  # what a vLLM worker does at start-up
    if current_platform.is_cpu():  # the other CPU bug (uninitialised temperatures) would blur these tests
        monkeypatch.setattr(rs, "expand_batch_to_tokens", cpu_expand_tokens.expand_batch_to_tokens)


def metadata(temperatures):
    t = torch.tensor(temperatures, dtype=torch.float32, device=DEVICE)
    empty = torch.tensor([], device=DEVICE)
    return SamplingMetadata(
        temperature=t, all_greedy=False, all_random=bool((t > 0).all()), top_p=None, top_k=None,
        generators={i: torch.Generator(device=DEVICE).manual_seed(i) for i in range(len(temperatures))},
        max_num_logprobs=None,
        no_penalties=True, prompt_token_ids=None, frequency_penalties=empty, presence_penalties=empty,
        repetition_penalties=empty, output_token_ids=[[] for _ in temperatures], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors())


def verify(drafts, targets, bonus, temperatures, draft_probs=None):
    """Rows of the rejection sampler's output; targets[i][j] is the target's (near-certain) token after the
    j-th draft of request i."""
    logits = torch.full((sum(map(len, drafts)), VOCAB), -50.0, device=DEVICE)
    for row, token in enumerate(t for ts in targets for t in ts):
        logits[row, token] = 50.0
    spec = SpecDecodeMetadata.make_dummy(drafts, device=logits.device)
    spec.target_logits_indices = torch.arange(logits.shape[0], device=DEVICE)
    spec.bonus_logits_indices = torch.empty(0, dtype=torch.int32, device=DEVICE)
    sampler = Mock(spec=Sampler)
    sampler.logprobs_mode = "raw_logprobs"
    sampler.return_value = SamplerOutput(sampled_token_ids=torch.tensor(bonus, device=DEVICE)[:, None],
                                                 logprobs_tensors=None)
    out = rs.RejectionSampler(sampler)(spec, draft_probs=draft_probs, logits=logits,
                                       sampling_metadata=metadata(temperatures))
    return out.sampled_token_ids.tolist()


CASES = [  # drafts, the target's tokens, bonus tokens, temperatures, expected rows
    ([[1, 49, -1]], [[1, 49, 7]], [9], [1.0], [[1, 49, 7, -1]]),  # all before -1 accepted: -1 becomes 7
    ([[1, 49, -1], [3, 4, 5]], [[1, 49, 7], [3, 4, 5]], [9, 8], [1.0, 1.0],
     [[1, 49, 7, -1], [3, 4, 5, 8]]),  # other requests keep their drafts and bonus
    ([[1, -1, 2]], [[6, 11, 2]], [9], [1.0], [[6, -1, -1, -1]]),  # rejected before the placeholder: unchanged
    ([[-1, 2], [1, -1]], [[5, 2], [1, 3]], [9, 8], [0.0, 1.0], [[5, -1, -1], [1, 3, -1]]),  # greedy row untouched
]


@pytest.mark.parametrize("drafts, targets, bonus, temperatures, expected", CASES)
def test_placeholder_drafts_are_rejected(monkeypatch, drafts, targets, bonus, temperatures, expected):
    monkeypatch.setattr(rs, "_rejection_random_sample", placeholder_drafts._rejection_random_sample)
    assert verify(drafts, targets, bonus, temperatures) == expected


def test_with_draft_probabilities(monkeypatch):
    monkeypatch.setattr(rs, "_rejection_random_sample", placeholder_drafts._rejection_random_sample)
    q = torch.full((3, VOCAB), 1.0 / VOCAB, device=DEVICE)
    assert verify([[1, 49, -1]], [[1, 49, 7]], [9], [1.0], draft_probs=q)[0][2] == 7


@pytest.mark.skipif(not current_platform.is_cpu(), reason="shows the stock CPU kernel's behaviour")
def test_stock_kernel_emits_the_placeholder(monkeypatch):
    """Without the hook, vLLM 0.32's CPU kernel reads p(-1) (the previous row's last entry, ~1 here) and
    accepts the placeholder: -1 comes out where the target's token 7 belongs."""
    monkeypatch.setattr(rs, "_rejection_random_sample", placeholder_drafts._original)
    assert verify([[1, 49, -1]], [[1, 49, 7]], [9], [1.0])[0][:3] == [1, 49, -1]
