"""`vllm-sdsat profile`: the step breakdown on a hand-made worker trace, the output files, and one real
engine run (slow)."""
import argparse
import json

import pytest

from vllm_sdsat.bench.profile import (COMPONENTS, markdown_table, parse_method, plot, run_cli, step_breakdown,
                                      summarize)

MS = 1_000_000  # ns


def spec_step(t0, new_reqs=0):
    """One speculative engine step at t0 (ms), 20 ms long: every component a known number of ms."""
    def ms(a, b):
        return (t0 + a) * MS, (t0 + b) * MS
    s = "gpu_model_runner: "
    return [
        ("execute_model", *ms(0, 8), {"tokens": 8, "reqs": 1, "new_reqs": new_reqs}),
        (s + "preprocess", *ms(0.5, 1.5), None),
        ("model", *ms(1.5, 5.5), None),  # the target's own forward: part of "forward"
        (s + "forward", *ms(1.5, 5.5), None),
        ("compute_logits", *ms(5.5, 6), None),
        (s + "postprocess", *ms(5.5, 6), None),
        ("sample_tokens", *ms(9, 16), None),  # 1 ms wait before it
        (s + "sample", *ms(9, 10), None),
        (s + "bookkeep", *ms(10, 10.5), None),
        (s + "draft", *ms(10.5, 15), None),
        ("model", *ms(11, 13), None),  # the drafter's model calls: 2 + 1 ms
        ("compute_logits", *ms(13, 14), None),
        ("take_draft_token_ids", *ms(18, 18.5), None),  # 2 ms wait before it
    ]  # the next step starts at t0 + 20: 1.5 ms engine core


def test_step_breakdown_tiles_the_step():
    events = spec_step(0, new_reqs=1) + spec_step(20) + spec_step(40) + spec_step(60) + spec_step(80, new_reqs=1)
    steps = step_breakdown(events[::-1])  # order does not matter
    # counted: the steps at 20 and 40 (0 is a prefill, 60 is followed by one, 80 is the last)
    assert len(steps) == 2
    for step in steps:
        assert step["total_ms"] == pytest.approx(20)
        assert sum(step[c] for c in COMPONENTS) == pytest.approx(20)
        expected = {"preprocess": 1, "forward": 4, "logits": 0.5, "sample": 1, "bookkeep": 0.5, "draft_model": 3,
                    "draft_other": 1.5, "runner_other": (8 + 7 + 0.5) - 11.5, "wait_sample": 1,
                    "wait_take_draft": 2, "engine_core": 1.5}
        assert {c: step[c] for c in expected} == pytest.approx(expected)
    summary = summarize(steps)
    assert summary["steps"] == 2 and summary["ms_per_step"] == pytest.approx(20)
    assert summary["components_ms"]["draft_model"] == pytest.approx(3)


def test_plain_step_has_no_draft_wait():
    def plain(t0, new_reqs=0):
        return [("execute_model", t0 * MS, (t0 + 3) * MS, {"tokens": 1, "reqs": 1, "new_reqs": new_reqs}),
                ("gpu_model_runner: forward", (t0 + 1) * MS, (t0 + 3) * MS, None),
                ("sample_tokens", (t0 + 3.5) * MS, (t0 + 4) * MS, None)]
    steps = step_breakdown(plain(0) + plain(5) + plain(10))
    assert len(steps) == 2
    assert steps[0]["wait_sample"] == pytest.approx(0.5) and steps[0]["wait_take_draft"] == 0
    assert steps[0]["engine_core"] == pytest.approx(1) and steps[0]["runner_other"] == pytest.approx(1.5)


def test_parse_method():
    assert parse_method("none") == ("none", "none", None)
    assert parse_method("sdsat:7") == ("sdsat K=7", "sdsat", {"method": "sdsat", "num_speculative_tokens": 7})
    assert parse_method("ngram:1")[2]["prompt_lookup_max"] == 4
    assert parse_method("sdsat:auto")[2] == {"method": "sdsat"}
    assert parse_method("sdsat:0")[2]["num_speculative_tokens_per_batch_size"] == [(1, 1 << 20, 0)]
    for bad in ("ngram", "eagle:3", "ngram:0", "sdsat:-1"):
        with pytest.raises(ValueError):
            parse_method(bad)


def test_table_and_plot_from_json(tmp_path):
    run = {**summarize(step_breakdown(spec_step(0) + spec_step(20) + spec_step(40))), "method": "sdsat K=7",
           "batch_size": 1, "speculative_config": {"method": "sdsat"}, "tok_s": 100.0, "num_drafts": 10,
           "mean_accepted_length": 5.0, "output_tokens": 50}
    files = []
    for label in ("before", "after"):
        files.append(tmp_path / f"profile_{label}.json")
        files[-1].write_text(json.dumps({"label": label, "meta": {}, "runs": [run]}))
    table = markdown_table([json.loads(f.read_text()) for f in files])
    assert "| before: sdsat K=7 | 1 | 20.00 | 5.00 | 100 |" in table and "after: sdsat K=7" in table
    args = argparse.Namespace(output=str(tmp_path / "out"), from_json=[str(f) for f in files])
    assert run_cli(args) == 0
    assert (tmp_path / "out" / "profile_before_vs_after.png").stat().st_size > 10_000
    assert plot([json.loads(files[0].read_text())], tmp_path / "one.png").is_file()


@pytest.mark.slow
def test_real_engine_run(tmp_path):
    """One engine (ngram K=2), one prompt, 24 tokens: the components tile the measured steps."""
    from vllm_sdsat.cli import main

    assert main(["profile", "--methods", "ngram:2", "--batch-sizes", "1", "--prompts", "1", "--max-tokens", "24",
                 "--repeats", "1", "--enforce-eager", "--label", "t", "--output", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "profile_t.json").read_text())["runs"][0]
    assert run["steps"] >= 5 and run["num_drafts"] >= 1  # ngram drafts only where the prompt matches
    assert sum(run["components_ms"].values()) == pytest.approx(run["ms_per_step"])
    assert run["components_ms"]["forward"] > 0 and run["components_ms"]["sample"] > 0
