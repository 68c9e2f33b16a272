"""Trainer, self-distillation and `vllm-sdsat train` end to end, on tiny random Llama models."""
import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vllm_sdsat import cli
from vllm_sdsat.config import SdsatConfig
from vllm_sdsat.training.evaluate import evaluate
from vllm_sdsat.training.data import IGNORE, AdaptiveSpanCollator
from vllm_sdsat.training.train import greedy_at_anchors, self_contexts, self_distill

torch.set_num_threads(1)
SPECIAL = ["<|endoftext|>", "<|pad|>"] + [f"<|adaptive_{i}|>" for i in range(4)]  # ids 0, 1, 2..5
TEXT = [f"def f{i}(x):\n    return x * {i} + {i * i}  # value {i % 7}\n" for i in range(120)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """bf16 tiny models (spare vocabulary rows, exactly the tokenizer's, too few) sharing a small BPE
    tokenizer, and a jsonl of code-like text."""
    root = tmp_path_factory.mktemp("train")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=SPECIAL[0], pad_token=SPECIAL[1])
    for name, vocab in [("model", 320), ("exact_vocab", len(tok)), ("small_vocab", 64)]:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                     eos_token_id=0, pad_token_id=1)).to(torch.bfloat16).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    with open(root / "data.jsonl", "w") as f:
        for text in TEXT:
            f.write(json.dumps({"text": text}) + "\n")
    return root


def train(workdir, tmp_path, *extra):
    args = ["train", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"),
            "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32",
            "--max-adaptive", "3", "--spans-per-seq", "3", "--max-steps", "3", "--batch-size", "2",
            "--logging-steps", "1", "--lr", "1e-3", *extra]
    return cli.main(args)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_at_anchors_equals_generate(random_llama, attn):
    model = random_llama(heads=4, init=0.2, attn_implementation=attn)  # init 0.2: the argmax depends on context
    x = torch.randint(10, 60, (2, 20), generator=torch.Generator().manual_seed(0))
    anchors, steps = [[0, 5, 19], [3]], 4
    got = greedy_at_anchors(model, x, anchors, steps)
    for b, row in enumerate(anchors):
        for a, tokens in zip(row, got[b]):
            ref = model.generate(x[b:b + 1, :a + 1], max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                                 do_sample=False)
            assert tokens == ref[0, a + 1:].tolist()


def test_self_distill_labels_are_the_greedy_continuation(random_llama, tmp_path):
    model = random_llama(init=0.2)
    rows = torch.randint(10, 60, (3, 16), generator=torch.Generator().manual_seed(2)).tolist()
    out = self_distill(Dataset.from_dict({"input_ids": rows}), model, max_adaptive=3, spans_per_seq=4.0, seed=0,
                       cache_file=tmp_path / "distill.arrow", batch_size=2)
    assert sum(len(r["anchors"]) for r in out) > 4
    for x, r in zip(rows, out):
        for a, labels in zip(r["anchors"], r["greedy"]):
            ref = model.generate(torch.tensor([x[:a + 1]]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
            assert labels == ref[0, a + 2:].tolist()  # slots 1..L: x^_{a+2}..x^_{a+1+L}


def test_self_contexts_continue_with_the_model_and_mask_real_labels(random_llama, tmp_path):
    model = random_llama(init=0.2)
    rows = torch.randint(10, 60, (8, 16), generator=torch.Generator().manual_seed(3)).tolist()
    out = self_contexts(Dataset.from_dict({"input_ids": rows}), model, fraction=0.5, prompt_len=6, seed=0,
                        cache_file=tmp_path / "contexts.arrow", batch_size=3)
    changed = [r["real_until"] == 6 for r in out]
    assert 0 < sum(changed) < len(rows)
    for x, r, c in zip(rows, out, changed):
        if not c:
            assert r["input_ids"] == x and r["real_until"] == 16
            continue
        ref = model.generate(torch.tensor([x[:6]]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert r["input_ids"] == ref[0].tolist()
    ex = next(r for r, c in zip(out, changed) if c)
    batch = AdaptiveSpanCollator([2], 3, 0.0)([ex])
    assert batch["real_labels"][0, :5].tolist() == ex["input_ids"][1:6]  # labels x_1..x_5: data
    assert (batch["real_labels"][0, 5:] == IGNORE).all()  # x_6.. were generated


@pytest.mark.parametrize("method", ["sdsat", "basic"])
def test_train_cli_end_to_end(workdir, tmp_path, method):
    assert train(workdir, tmp_path, "--adaptive-token-ids", "2", "3", "--num-speculative-tokens", "3",
                 "--method", method) == 0
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["sdsat"] == {"adaptive_token_ids": [2, 3], "max_adaptive_tokens": 3, "num_speculative_tokens": 3}
    assert config["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    assert (out / "tokenizer.json").is_file()
    assert SdsatConfig.from_pretrained(out).adaptive_id(2) == 3
    logs = [e for e in json.loads((out / "train_log.json").read_text()) if "loss" in e]
    assert len(logs) == 3
    for e in logs:
        assert e["loss_real"] > 0 and e["loss_adaptive"] > 0
        assert e["loss"] == pytest.approx(e["loss_real"] + e["loss_adaptive"], abs=1e-3)


def test_train_self_distillation_is_cached(workdir, tmp_path):
    extra = ["--adaptive-token-ids", "2", "--labels", "self", "--save-dtype", "float32", "--self-contexts", "0.5",
             "--context-prompt-len", "16"]
    assert train(workdir, tmp_path, *extra) == 0
    caches = sorted((tmp_path / "cache").glob("*-*.arrow"))
    assert [c.name.split("-")[0] for c in caches] == ["contexts", "distill"]
    stamps = [c.stat().st_mtime_ns for c in caches]
    assert train(workdir, tmp_path, *extra) == 0
    assert [c.stat().st_mtime_ns for c in caches] == stamps  # second run read both caches
    logs = [e for e in json.loads((tmp_path / "out" / "train_log.json").read_text()) if "loss" in e]
    assert all(e["loss_adaptive"] > 0 for e in logs)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_train_with_new_embedding_rows(workdir, tmp_path):
    vocab = json.loads((workdir / "exact_vocab" / "config.json").read_text())["vocab_size"]
    assert train(workdir, tmp_path, "--resize-embeddings", "2", "--model", str(workdir / "exact_vocab")) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["sdsat"]["adaptive_token_ids"] == [vocab, vocab + 1]
    assert config["vocab_size"] == vocab + 2
    assert load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"].shape[0] == vocab + 2


@pytest.mark.parametrize("extra, message", [
    (["--adaptive-token-ids", "5000"], "outside the model's vocabulary"),
    (["--adaptive-token-ids", "2", "--max-adaptive", "0"], "must be >= 1"),
    (["--adaptive-token-ids", "2", "--max-adaptive", "31"], "shorter than a span"),
    (["--adaptive-token-ids", "2", "--method", "basic", "--labels", "self"], "--labels data only"),
    (["--adaptive-token-ids", "2", "--self-contexts", "0.5"], "needs --labels self"),
    (["--adaptive-token-ids", "2", "--labels", "self", "--self-contexts", "0.5", "--context-prompt-len", "32"],
     "--context-prompt-len must lie in"),
    (["--max-adaptive", "2"], "either --adaptive-token-ids or --resize-embeddings"),
    (["--adaptive-token-ids", "2", "--model", "SMALL"], "do not belong together"),
    (["--adaptive-token-ids", "2", "--data", "missing.jsonl"], "no data file at missing.jsonl"),
])
def test_bad_input_exits_2_with_one_line(workdir, tmp_path, capsys, extra, message):
    extra = [str(workdir / "small_vocab") if e == "SMALL" else e for e in extra]
    assert train(workdir, tmp_path, *extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("vllm-sdsat train: error:") and message in errors[0]
    assert "Traceback" not in err and not (tmp_path / "out" / "config.json").exists()


def test_evaluate_reports_slots(random_llama):
    model = random_llama(init=0.2)
    seqs = torch.randint(10, 60, (3, 24), generator=torch.Generator().manual_seed(1))
    report = evaluate(model, seqs, SdsatConfig((2, 3), 3), anchors_per_seq=2)
    assert report["anchors"] == 6 and len(report["slot_top1_data"]) == len(report["slot_top1_greedy"]) == 3
    assert 2 <= report["tokens_per_loop"] <= 5 and 0 < report["standard_loss"]
