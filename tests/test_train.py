"""Trainer, self-distillation and `vllm-sdsat train` end to end, on tiny random Llama models."""
import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset, concatenate_datasets
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          TrainerCallback)

from conftest import REPO
from vllm_sdsat import cli
from vllm_sdsat.config import SdsatConfig
from vllm_sdsat.training.evaluate import evaluate
from vllm_sdsat.training.data import IGNORE, AdaptiveSpanCollator
from vllm_sdsat.training import train as train_module
from vllm_sdsat.training.self_distill import greedy_at_anchors, self_contexts, self_distill

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
    (["--adaptive-token-ids", "2", "--labels", "self", "--self-contexts", "0.5", "--context-prompt-len", "16",
      "--soft-targets"], "--soft-targets needs sampled self-contexts"),
    (["--adaptive-token-ids", "2", "--soft-targets", "--labels", "self"], "needs sampled"),
    (["--adaptive-token-ids", "2", "--self-context-temperatures", "1"], "--self-context-temperatures needs"),
    (["--adaptive-token-ids", "2", "--self-context-temperatures", "0,-1"], "must be >= 0"),
    (["--adaptive-token-ids", "2", "--model", "SMALL"], "do not belong together"),
    (["--adaptive-token-ids", "2", "--data", "missing.jsonl"], "no data file at missing.jsonl"),
    (["--adaptive-token-ids", "2", "--resume"], "no checkpoint-* folder"),
    (["--adaptive-token-ids", "2", "--warmup-ratio", "1.5"], "--warmup-ratio is a fraction"),
    (["--adaptive-token-ids", "2", "--max-adaptive", "2", "--num-speculative-tokens", "4"],
     "slots past L were never trained"),
])
def test_bad_input_exits_2_with_one_line(workdir, tmp_path, capsys, extra, message):
    extra = [str(workdir / "small_vocab") if e == "SMALL" else e for e in extra]
    assert train(workdir, tmp_path, *extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("vllm-sdsat train: error:") and message in errors[0]
    assert "Traceback" not in err and not (tmp_path / "out" / "config.json").exists()


def train_args(workdir, out, *extra):
    return train_module.parse_args([
        "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--output", str(out),
        "--cache-dir", str(out.parent / "cache"), "--seq-len", "32", "--max-adaptive", "3", "--spans-per-seq", "3",
        "--batch-size", "2", "--logging-steps", "1", "--lr", "1e-3", "--adaptive-token-ids", "2", *extra])


class CountSteps(TrainerCallback):
    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_resume_from_a_checkpoint_continues_the_same_run(workdir, tmp_path):
    """4 steps with a checkpoint every 2; then a second run resumed from checkpoint-2 runs only steps 3-4 and
    ends with the same weights and losses as the uninterrupted run."""
    full = train_args(workdir, tmp_path / "full", "--max-steps", "4", "--save-steps", "2", "--save-dtype", "float32")
    assert train_module.run(full).is_dir()
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    trainer, _ = train_module.build_trainer(train_args(workdir, tmp_path / "resumed", "--max-steps", "4"))
    counter = CountSteps()
    trainer.add_callback(counter)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert counter.steps == 2 and trainer.state.global_step == 4
    expected = load_file(tmp_path / "full" / "model.safetensors")
    got = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    full_losses = [(e["step"], e["loss"]) for e in json.loads((tmp_path / "full" / "train_log.json").read_text())
                   if "loss" in e]
    assert losses == full_losses and len(losses) == 4


def test_sampled_contexts_and_soft_targets_reach_the_trainer(workdir, tmp_path):
    args = train_args(workdir, tmp_path / "out", "--max-steps", "3", "--labels", "self", "--self-contexts", "1.0",
                      "--context-prompt-len", "16", "--self-context-temperatures", "0,0.2,1.0", "--soft-targets",
                      "--save-dtype", "float32")
    assert args.self_context_temperatures == [0.0, 0.2, 1.0] and args.soft_targets
    with pytest.raises(SystemExit):
        train_args(workdir, tmp_path / "out", "--self-context-temperatures", "0,hot")
    trainer, _ = train_module.build_trainer(args)
    data = trainer.train_dataset
    assert {round(t, 3) for t in data["temperature"]} == {0.0, 0.2, 1.0} and set(data["real_until"]) == {16}
    assert trainer.data_collator.soft_targets
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    assert (batch["soft_temperature"] > 0).sum() > 5 and (batch["adaptive_labels"] != IGNORE).sum() > 5
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(0 < e["loss_adaptive"] < 20 for e in logs)


def test_warmup_is_a_fraction_of_the_steps(workdir, tmp_path):
    trainer, _ = train_module.build_trainer(train_args(workdir, tmp_path / "out", "--max-steps", "40",
                                                       "--warmup-ratio", "0.1"))
    assert trainer.args.warmup_steps == 4 and trainer.args.get_warmup_steps(40) == 4  # whole steps on any version
    trainer.create_optimizer_and_scheduler(num_training_steps=40)
    lrs = []
    for _ in range(6):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[:5] == pytest.approx([0, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3]) and lrs[5] < 1e-3


def test_self_distillation_is_sharded_over_two_ranks(workdir, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank generates its own share of the self-contexts and labels into
    its own shard file; both train on the concatenation, which equals what one process generates."""
    common = ["--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--seq-len", "32",
              "--max-adaptive", "3", "--spans-per-seq", "3", "--max-steps", "40", "--batch-size", "4",
              "--adaptive-token-ids", "2", "--labels", "self", "--self-contexts", "0.5", "--context-prompt-len", "8",
              "--distill-batch-size", "1", "--save-dtype", "float32", "--logging-steps", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), "-m", "vllm_sdsat.cli", "train", *common, "--output", str(tmp_path / "two"),
                          "--cache-dir", str(tmp_path / "cache2")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    assert cli.main(["train", *common, "--output", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "cache1")]) == 0
    for kind in ("contexts", "distill"):
        one = sorted((tmp_path / "cache1").glob(f"{kind}-*-0of1.arrow"))
        shards = sorted((tmp_path / "cache2").glob(f"{kind}-*of2.arrow"))
        assert len(one) == 1 and [p.name.rsplit("-", 1)[1] for p in shards] == ["0of2.arrow", "1of2.arrow"]
        parts = [Dataset.from_file(str(p)) for p in shards]
        whole = Dataset.from_file(str(one[0]))
        assert abs(len(parts[0]) - len(parts[1])) <= 1 and len(parts[0]) + len(parts[1]) == len(whole) > 10
        assert concatenate_datasets(parts).to_dict() == whole.to_dict()
    distilled = Dataset.from_file(str(next((tmp_path / "cache1").glob("distill-*-0of1.arrow"))))
    assert sum(len(a) for a in distilled["anchors"]) > 0
    log = json.loads((tmp_path / "two" / "train_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [10, 20, 30, 40]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluate_matches_a_direct_measurement():
    """evaluate() on the embedded SDSAT model, against the same quantities measured directly: the standard
    loss from the model's own loss, and per anchor the drafts of [x_..a, A_1..A_k] against model.generate."""
    path = REPO / "examples" / "models" / "sdsat-tiny-code"
    if not (path / "config.json").is_file():
        pytest.skip("the embedded SDSAT model is not built")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    text = "".join(f"def add_{i}(a, b):\n    return a + b + {i}\n\n" for i in range(8))
    n, k = 24, 3
    ids = tok(text)["input_ids"]
    seqs = torch.tensor([ids[i * n:(i + 1) * n] for i in range(2)])
    cfg = SdsatConfig.from_pretrained(path, num_speculative_tokens=k + 1)
    report = evaluate(model, seqs, cfg, anchors_per_seq=n - k - 1)  # every anchor: no sampling involved

    with torch.no_grad():
        loss = torch.stack([model(input_ids=row[None], labels=row[None]).loss for row in seqs]).mean().item()
        accepted, hits = [], torch.zeros(k)
        for row in seqs.tolist():
            for a in range(n - k - 1):
                prompt = row[:a + 1]
                own = model.generate(torch.tensor([prompt]), max_new_tokens=k + 1, min_new_tokens=k + 1,
                                     do_sample=False)[0, a + 2:]  # the greedy x^_{a+2}..x^_{a+1+k}
                drafts = model(input_ids=torch.tensor([prompt + cfg.adaptive_ids(k)])).logits[0, -k:].argmax(-1)
                match = (drafts == own).int()
                hits += match
                accepted.append(match.cumprod(0).sum().item())
    assert report["anchors"] == len(accepted) == 2 * (n - k - 1)
    assert report["standard_loss"] == pytest.approx(loss, abs=1e-3)
    assert report["slot_top1_greedy"] == pytest.approx((hits / len(accepted)).tolist(), abs=1e-3)
    assert report["accepted"] == pytest.approx(sum(accepted) / len(accepted), abs=1e-3)
    assert report["tokens_per_loop"] == pytest.approx(2 + report["accepted"], abs=1e-3)
    assert 0 < report["accepted"] < k  # the comparison above is between non-trivial numbers
