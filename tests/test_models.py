"""The embedded models load in transformers and run in vLLM; the demo rejects a missing model in one line."""
import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from vllm_sdsat.cli import main as cli

MODELS = ["tiny-code", "tiny-code-drafter", "sdsat-tiny-code"]


@pytest.mark.parametrize("name", MODELS)
def test_loads_in_transformers(name):
    path = REPO / "examples" / "models" / name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size == 4096
    assert tok.convert_tokens_to_ids("<|adaptive_0|>") == 2 and tok("<|adaptive_0|>").input_ids == [2]


@pytest.mark.parametrize("name", ["tiny-code", "tiny-code-drafter"])
def test_runs_in_vllm(name):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(REPO / "examples" / "models" / name), max_model_len=512, enforce_eager=True)
    out = llm.generate(["def add(a, b):\n"], SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
    del llm
    gc.collect()
    assert len(out[0].outputs[0].token_ids) == 16


def test_demo_missing_model_is_one_line(tmp_path, capsys):
    assert cli(["demo", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model at" in err[0]
