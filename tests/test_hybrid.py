"""Hybrid drafting (`lookup: "ngram"`): lookup drafts where a request repeats itself, adaptive drafts elsewhere.

Config refusals build the engine config only; the rest runs real vLLM engines on the embedded SDSAT model
(fp32, like the other exactness tests), one engine per configuration.
"""
import gc
import json
import os
import subprocess
import sys

import pytest

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from conftest import REPO  # noqa: E402
from test_vllm import P_BOUND, PROMPTS, SDSAT_MODEL, TOP_K, make_llm, min_p_value, sample_counts  # noqa: E402
from vllm_sdsat.config import SdsatConfigError  # noqa: E402

os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
HYBRID = {"method": "sdsat", "lookup": "ngram", "prompt_lookup_min": 2}
# The model continues this list with "1, 1, 1, ...": for its first 64 tokens every step's last two tokens
# occurred before (checked with the HF model), so lookup always fires.
REPEATING = "values = [" + ", ".join(str(i % 4) for i in range(40))
MIXED = [REPEATING, *PROMPTS[:7]]  # one prompt where lookup fires, seven where it mostly does not
GREEDY = SamplingParams(max_tokens=128, temperature=0)


def engine_config(spec, **kwargs):
    return EngineArgs(model=SDSAT_MODEL, speculative_config=spec, max_model_len=512, dtype="float32",
                      **kwargs).create_engine_config()


@pytest.mark.parametrize("spec, kwargs, message", [
    ({"lookup": "ngarm"}, {}, "lookup must be one of 'none', 'ngram', 'suffix', got 'ngarm'"),
    ({"lookup": 1}, {}, "lookup must be one of"),
    ({"lookup": "suffix"}, {}, "lookup 'suffix'"),
    ({"lookup": "ngram"}, {"async_scheduling": True}, "async scheduling leaves a step behind"),
    ({"lookup": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, {}, "1 <= prompt_lookup_min <= prompt_"),
    ({"lookup": "ngram", "prompt_lookup_min": 0}, {}, "1 <= prompt_lookup_min"),
    ({"prompt_lookup_min": 2}, {}, "given without lookup"),
])
def test_bad_lookup_fails_at_config(spec, kwargs, message):
    with pytest.raises(SdsatConfigError, match=message):
        engine_config({"method": "sdsat", **spec}, **kwargs)


def test_lookup_config_resolves():
    """The lookup settings reach the workers in the sdsat block; async scheduling stays off, as vLLM
    keeps it for its host-side ngram drafter; 'none' is today's SDSAT."""
    config = engine_config(HYBRID | {"prompt_lookup_min": 2})
    block = config.model_config.hf_config.sdsat
    assert (block["lookup"], block["prompt_lookup_min"], block["prompt_lookup_max"]) == ("ngram", 2, 5)
    assert config.scheduler_config.async_scheduling is False
    assert "lookup" not in engine_config({"method": "sdsat", "lookup": "none"}).model_config.hf_config.sdsat


def draft_stats(worker):
    """On a worker: the proposer's counts of drafts by kind, and then a fresh count."""
    from vllm_sdsat.engine.draft_stats import DraftStats
    drafter = worker.model_runner.drafter
    summary, drafter.stats = drafter.stats.summary(), DraftStats()
    return summary


def count_draft_forwards(worker):
    """On a worker: count calls of the draft pass's forward from now on."""
    from vllm_sdsat.patches.draft_pass import TargetDraftPass
    original = TargetDraftPass.forward

    def forward(self, *args, **kwargs):
        TargetDraftPass.calls += 1
        return original(self, *args, **kwargs)

    TargetDraftPass.calls, TargetDraftPass.forward = 0, forward


def draft_forwards(worker):
    from vllm_sdsat.patches.draft_pass import TargetDraftPass
    return TargetDraftPass.calls


@pytest.fixture(scope="module")
def plain_outputs():
    llm = make_llm(None, async_scheduling=False)
    outs = llm.generate(MIXED, GREEDY, use_tqdm=False)
    del llm
    gc.collect()
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def hybrid_llm():
    llm = make_llm(HYBRID, async_scheduling=False)
    yield llm
    del llm
    gc.collect()


def test_greedy_mixed_rows_equal_plain(plain_outputs, hybrid_llm):
    """Lookup and adaptive rows in the same steps, automatic K (the default): plain vLLM's output."""
    outs = hybrid_llm.generate(MIXED, GREEDY, use_tqdm=False)
    (stats, *_) = hybrid_llm.collective_rpc(draft_stats)
    mismatched = [i for i, (o, e) in enumerate(zip(outs, plain_outputs)) if list(o.outputs[0].token_ids) != e]
    assert not mismatched, f"prompts {mismatched} differ from decoding without speculation"
    lookup, adaptive = stats["kinds"]["lookup"], stats["kinds"]["adaptive"]
    assert lookup["drafts"] > 0 and adaptive["drafts"] > 0 and stats["steps"]["mixed"] > 0, stats
    assert lookup["verified"] > 0 and adaptive["verified"] > 0  # acceptance is counted per kind
    assert stats["draft_passes"] <= stats["steps"]["adaptive"] + stats["steps"]["mixed"]


def test_lookup_only_batch_runs_no_draft_pass(plain_outputs, hybrid_llm):
    """A batch whose every drafting row has a lookup draft skips the draft pass, step after step: only
    the steps of automatic K's drafting mode (its warm-up and probes), where rows take adaptive drafts
    whatever their match, run one."""
    hybrid_llm.collective_rpc(count_draft_forwards)
    outs = hybrid_llm.generate([REPEATING] * 4, SamplingParams(max_tokens=64, temperature=0), use_tqdm=False)
    (calls, *_), (stats, *_) = hybrid_llm.collective_rpc(draft_forwards), hybrid_llm.collective_rpc(draft_stats)
    assert all(list(o.outputs[0].token_ids) == plain_outputs[0][:64] for o in outs)
    assert stats["steps"]["lookup"] > 0 and stats["steps"]["mixed"] == 0, stats
    assert calls == stats["draft_passes"] == stats["steps"]["adaptive"]


# One of automatic K's modes forced on every step (no warm-up), in a process of its own: the scheduler has
# to be in the process that patches it, and a hybrid engine there leaves numba's objects where vLLM's CPU
# platform scans for kernels when the next in-process engine of this test session starts.
FORCED_MODE_RUN = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, "tests")
from vllm_sdsat.engine import auto_k
from test_hybrid import GREEDY, HYBRID, MIXED, count_draft_forwards, draft_forwards, draft_stats
from test_vllm import make_llm
original = auto_k.AutoK.plan
auto_k.AutoK.plan = lambda self, *args: setattr(self, "warmup", {False: (), True: ()}) or original(self, *args)
auto_k.SizeClass.next_mode = lambda self: auto_k.{mode}
observed = {"lookup": 0, "adaptive": 0}  # verified drafts as the scheduler's automatic K is told of them
observe = auto_k.AutoK.observe_drafts
def counting(self, req_id, num_drafts, num_accepted, sampled=False, lookup=False):
    observed["lookup" if lookup else "adaptive"] += 1
    return observe(self, req_id, num_drafts, num_accepted, sampled, lookup)
auto_k.AutoK.observe_drafts = counting
llm = make_llm(HYBRID, async_scheduling=False)
llm.collective_rpc(count_draft_forwards)
outs = llm.generate(MIXED, GREEDY, use_tqdm=False)
print("RESULT " + json.dumps({"outputs": [list(o.outputs[0].token_ids) for o in outs],
                              "calls": llm.collective_rpc(draft_forwards)[0],
                              "stats": llm.collective_rpc(draft_stats)[0], "observed": observed}))
"""


def test_lookup_mode_of_automatic_k_drafts_lookups_alone(plain_outputs):
    """Automatic K's lookup mode: rows with a lookup match take it, the others draft nothing, the
    draft pass never runs, and the output is plain vLLM's. The scheduler is told that the drafts it
    verifies are lookup drafts (from the worker process, with the drafts), so they do not count towards
    the acceptance that prices adaptive drafts."""
    result = run_forced_mode("LOOKUP", plain_outputs)
    stats = result["stats"]
    assert stats["kinds"]["lookup"]["verified"] > 0 and stats["kinds"]["adaptive"]["drafts"] == 0, stats
    assert result["calls"] == 0 and stats["draft_passes"] == 0
    assert result["observed"]["lookup"] > 0 and result["observed"]["adaptive"] == 0, result["observed"]


def test_drafting_mode_of_automatic_k_takes_no_lookup_drafts(plain_outputs):
    """Automatic K's drafting mode in a hybrid engine: rows with a lookup match take adaptive drafts too
    (where lookup drafts are not accepted, as when sampling at T = 1.0, this mode wins)."""
    result = run_forced_mode("DRAFTING", plain_outputs)
    stats = result["stats"]
    assert stats["kinds"]["adaptive"]["verified"] > 0 and stats["kinds"]["lookup"]["drafts"] == 0, stats
    assert result["observed"]["adaptive"] > 0 and result["observed"]["lookup"] == 0, result["observed"]


def run_forced_mode(mode: str, plain_outputs) -> dict:
    """A hybrid engine with automatic K held in one mode, on MIXED: its outputs must be plain vLLM's."""
    done = subprocess.run([sys.executable, "-c", FORCED_MODE_RUN.replace("{mode}", mode)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    mismatched = [i for i, (o, e) in enumerate(zip(result["outputs"], plain_outputs)) if o != e]
    assert not mismatched, f"prompts {mismatched} differ from decoding without speculation"
    return result


# Lookup fires on the prompt's own earlier docstring, whose text the target often does not follow at
# T = 1: lookup drafts are then low-probability tokens, where a wrong q (not one-hot) would show.
ECHO_PROMPT = 'def parse_config(path):\n    """Read the file.\n    """\n\n\ndef parse_config(path):\n    """'


def test_sampling_with_hybrid_matches_plain_distribution():
    plain, _ = sample_counts(None, seed=11, prompt=ECHO_PROMPT, params=TOP_K)
    stats = []
    hybrid, _ = sample_counts(HYBRID, seed=12, prompt=ECHO_PROMPT, params=TOP_K,
                              llm_kwargs={"async_scheduling": False},
                              after=lambda llm: stats.extend(llm.collective_rpc(draft_stats)))
    assert min_p_value(plain, hybrid) > P_BOUND
    kinds = stats[0]["kinds"]
    assert kinds["lookup"]["verified"] > 0 and kinds["adaptive"]["verified"] > 0, stats[0]
    assert stats[0]["steps"]["mixed"] > 0
