"""SDSAT fine-tuning: a Hugging Face Trainer whose batches carry adaptive spans (see data.py).

    vllm-sdsat train --model BASE --data train.jsonl --adaptive-token-ids 2 --max-adaptive 5 --output OUT

Loss = CE(real tokens) + w * CE(adaptive tokens); both parts are logged (loss_real, loss_adaptive).
Being a plain `Trainer`, it runs unchanged under accelerate / torchrun / DeepSpeed / FSDP; pass extra
TrainingArguments with --training-arg KEY=VALUE. The output is a normal checkpoint (model, tokenizer)
whose config.json carries the `sdsat` block that inference reads.

--labels self (self-distillation): adaptive slots learn the base model's own greedy continuation,
which is exactly what greedy verification accepts. Before training, the frozen base model decodes
L + 1 greedy tokens after every span anchor of every training sequence; the labels are cached on
disk (keyed by model files, data and settings) and reused by later runs. Real tokens keep learning
the data, never generated text. Cost: about one forward pass over the training data, plus L decode
steps of one token per anchor; a tqdm bar shows it.

--self-contexts F (with --labels self): in a fraction F of the sequences, everything after the first
--context-prompt-len tokens is replaced by the base model's own greedy continuation, generated once
and cached like the labels. At inference the drafts follow the model's own output, not human code;
these sequences put the adaptive slots in that context during training. Real-token loss stays on
the real prompt part only. Cost: (seq_len - prompt_len) decode steps per chosen sequence.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
from collections import defaultdict
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Sequence, Value, load_dataset
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback,
                          TrainingArguments)

from vllm_sdsat.config import SdsatConfig, SdsatConfigError
from vllm_sdsat.console import console
from vllm_sdsat.paths import CACHE_DIR
from vllm_sdsat.training.data import IGNORE, METHODS, AdaptiveSpanCollator, attention_bias, forward_inputs, sample_anchors

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # any other suffix: plain text


def load_chunks(path: str, tokenizer, seq_len: int, data_format: str = "auto", cache_dir: str | None = None) -> Dataset:
    """Fixed-length sequences (column `input_ids`, seq_len tokens each) from local data files.

    `path` is a file or a glob. json/jsonl/parquet records need a `text` field (tokenized here, EOS
    appended per record) or pre-tokenized `input_ids`; a text file is one record. Records are
    concatenated and cut into seq_len pieces, dropping the remainder of every 1,000 records.
    Tokenizing and chunking are cached by `datasets` (in cache_dir when given).
    """
    files = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    if not files or not all(Path(f).is_file() for f in files):
        raise FileNotFoundError(f"no data file at {path}")
    fmt = FORMATS.get(Path(files[0]).suffix, "text") if data_format == "auto" else data_format
    ds = load_dataset(fmt, data_files=files, split="train", cache_dir=cache_dir,
                      **({"sample_by": "document"} if fmt == "text" else {}))
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}

    def cut(batch):
        flat = list(chain.from_iterable(batch["input_ids"]))
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]}

    if "input_ids" in ds.column_names:
        tokens = ds.select_columns(["input_ids"])
    elif "text" in ds.column_names:
        tokens = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")
    else:
        raise SdsatConfigError(f"data: records need a 'text' or 'input_ids' field, {path} has {ds.column_names}")
    chunks = tokens.map(cut, batched=True, batch_size=1000, remove_columns=tokens.column_names,
                        desc=f"cut into {seq_len}-token sequences")
    if len(chunks) == 0:
        raise SdsatConfigError(f"data: {path} holds fewer than --seq-len {seq_len} tokens")
    return chunks


@torch.inference_mode()
def greedy_at_anchors(model, input_ids: torch.Tensor, anchors: list[list[int]], steps: int) -> list[list[list[int]]]:
    """For every anchor a of row b: the greedy continuation (steps + 1 tokens) of input_ids[b, :a + 1].

    One cached forward pass over the rows, then `steps` passes of one token per anchor. Each anchor's
    continuation is a branch that sees its own prefix and its own earlier tokens (the span mask of
    data.py, greedy tokens in place of adaptive ones), so all branches decode at once.
    Cost: about one forward pass over input_ids plus steps * (number of anchors) one-token queries.
    """
    device = model.device
    B, n = input_ids.shape
    S = max(1, max(len(a) for a in anchors))
    anchor = torch.tensor([a + [0] * (S - len(a)) for a in anchors], device=device)  # padded anchors: ignored
    keep = torch.unique(anchor)
    out = model(input_ids=input_ids.to(device), use_cache=True, logits_to_keep=keep)
    token = out.logits.argmax(-1).gather(1, torch.searchsorted(keep, anchor))
    tokens, cache = [token], out.past_key_values
    sees_prefix = torch.arange(n, device=device) <= anchor[..., None]  # (B, S, n)
    sees_own = torch.eye(S, dtype=torch.bool, device=device).expand(B, S, S)  # one block per decoded step
    for t in range(1, steps + 1):
        mask = torch.cat([sees_prefix] + [sees_own] * t, dim=-1)[:, None]
        out = model(input_ids=token, position_ids=anchor + t, attention_mask=attention_bias(mask, model.dtype),
                    past_key_values=cache, use_cache=True)
        token = out.logits.argmax(-1)
        tokens.append(token)
    greedy = torch.stack(tokens, dim=-1).tolist()
    return [row[:len(a)] for row, a in zip(greedy, anchors)]


@torch.inference_mode()
def greedy_continuation(model, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) greedy tokens after equal-length prompts (B, P), with a KV cache; EOS does not stop it."""
    out = model(input_ids=prompts.to(model.device), use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(steps - 1):
        out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1).cpu()


def self_contexts(chunks: Dataset, model, fraction: float, prompt_len: int, seed: int, cache_file: Path,
                  batch_size: int = 8, bf16: bool = False) -> Dataset:
    """In a `fraction` of the sequences (drawn per index), replace the tokens after the first
    prompt_len by the model's greedy continuation of those prompt_len tokens. Adds the column
    `real_until`: how many leading tokens are data (the whole sequence where nothing was replaced).

    Runs like self_distill: frozen model, batched, tqdm bar, cached as an Arrow file at cache_file.
    """
    def continue_some(batch, indices):
        rows = [list(x) for x in batch["input_ids"]]
        chosen = [b for b, i in enumerate(indices) if np.random.default_rng([seed, i, 1]).random() < fraction]
        real_until = [len(x) for x in rows]
        if chosen:
            prompts = torch.tensor([rows[b][:prompt_len] for b in chosen])
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                tails = greedy_continuation(model, prompts, len(rows[chosen[0]]) - prompt_len)
            for b, tail in zip(chosen, tails.tolist()):
                rows[b][prompt_len:] = tail
                real_until[b] = prompt_len
        return {"input_ids": rows, "real_until": real_until}

    features = Features({**chunks.features, "real_until": Value("int32")})
    return map_with_frozen_model(chunks, continue_some, model, features, cache_file, batch_size,
                                 "self-contexts: greedy continuations")


def self_distill(chunks: Dataset, model, max_adaptive: int, spans_per_seq: float, seed: int, cache_file: Path,
                 batch_size: int = 8, bf16: bool = False) -> Dataset:
    """Add columns `anchors` (Poisson(spans_per_seq) uniform anchors per sequence) and `greedy`
    (per anchor, the model's greedy tokens x^_{a+2}..x^_{a+1+L}: the labels of slots 1..L).

    Runs the model (frozen, eval mode, bf16 autocast if asked) once over the data, batched, with a
    progress bar; the result is an Arrow file at cache_file, loaded instead when it already exists.
    """
    def add_labels(batch, indices):
        anchors = [sample_anchors(np.random.default_rng([seed, i]), len(x), spans_per_seq)
                   for i, x in zip(indices, batch["input_ids"])]
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            greedy = greedy_at_anchors(model, torch.tensor(batch["input_ids"]), anchors, max_adaptive)
        return {"anchors": anchors, "greedy": [[g[1:] for g in row] for row in greedy]}

    features = Features({**chunks.features, "anchors": Sequence(Value("int32")),
                         "greedy": Sequence(Sequence(Value("int32")))})
    return map_with_frozen_model(chunks, add_labels, model, features, cache_file, batch_size,
                                 "self-distillation: greedy labels")


def map_with_frozen_model(chunks: Dataset, fn, model, features: Features, cache_file: Path, batch_size: int,
                          desc: str) -> Dataset:
    """chunks.map(fn) in batches with indices, the model in eval mode, cached as an Arrow file."""
    was_training = model.training
    model.eval()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with console.bar(total=len(chunks), desc=desc, unit="seq") as bar:
        def fn_with_progress(batch, indices):
            out = fn(batch, indices)
            bar.update(len(indices))
            return out

        out = chunks.map(fn_with_progress, batched=True, batch_size=batch_size, with_indices=True,
                         features=features, cache_file_name=str(cache_file), new_fingerprint=cache_file.stem,
                         desc=desc)
    model.train(was_training)
    return out


def distill_cache_file(cache_dir: Path, model_path: str, chunks: Dataset, args, kind: str = "distill") -> Path:
    """Cache file named by a hash of the model's files (name, size, mtime), the data and the settings."""
    model_dir = Path(model_path)
    files = sorted(model_dir.iterdir()) if model_dir.is_dir() else []
    key = [str(model_dir.resolve()) if files else model_path,
           [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()],
           chunks._fingerprint, args.max_adaptive, args.spans_per_seq, args.seed, args.bf16, args.self_contexts,
           args.context_prompt_len]
    return cache_dir / f"{kind}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]}.arrow"


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not IGNORE (0 when there are none)."""
    keep = labels != IGNORE
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum") / keep.sum().clamp(min=1)


class SdsatTrainer(Trainer):
    """Trainer with loss = CE(real) + adaptive_weight * CE(adaptive) on AdaptiveSpanCollator batches.

    The two parts are averaged over the steps since the last log (and over processes) and logged as
    loss_real and loss_adaptive next to the Trainer's own loss. Costs one extra all-reduce per log.
    """

    def __init__(self, *args, adaptive_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.adaptive_weight = adaptive_weight
        self.loss_is_scaled_for_ga = False  # per-batch means: the Trainer divides by accumulation steps
        self.loss_parts = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**forward_inputs(inputs, self.model.dtype))
        real = masked_ce(outputs.logits, inputs["real_labels"])
        adaptive = masked_ce(outputs.logits, inputs["adaptive_labels"])
        if model.training:
            self.loss_parts["loss_real"].append(real.detach())
            self.loss_parts["loss_adaptive"].append(adaptive.detach())
        loss = real + self.adaptive_weight * adaptive
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self.loss_parts:
            means = torch.stack([torch.stack(v).mean() for v in self.loss_parts.values()])
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({k: round(m, 4) for k, m in zip(self.loss_parts, means.tolist())})
            self.loss_parts.clear()
        super().log(logs, start_time)


class ConsoleProgress(TrainerCallback):
    """The training bar on the terminal (`console`), with the last logged losses beside it."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = console.bar(total=state.max_steps, desc="sdsat train", unit="step", initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.bar.set_postfix({k: v for k, v in logs.items() if k.startswith("loss")})

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar.close()


def add_adaptive_rows(model, tokenizer, count: int) -> list[int]:
    """Add `count` new special tokens <|sdsat_adaptive_j|> and embedding rows for them; their ids."""
    names = [f"<|sdsat_adaptive_{j}|>" for j in range(count)]
    tokenizer.add_tokens(names, special_tokens=True)
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
    return tokenizer.convert_tokens_to_ids(names)


def build_trainer(args: argparse.Namespace) -> tuple[SdsatTrainer, SdsatConfig]:
    """Model, tokenizer, data (self-distilled if asked) and trainer from parsed CLI arguments."""
    if args.method == "basic" and args.labels == "self":
        raise SdsatConfigError("sdsat: --method basic trains with --labels data only")
    if args.self_contexts and args.labels != "self":
        raise SdsatConfigError("sdsat: --self-contexts needs --labels self")
    if not 0 <= args.self_contexts <= 1:
        raise SdsatConfigError(f"sdsat: --self-contexts is a fraction in [0, 1], got {args.self_contexts}")
    if args.self_contexts and not args.max_adaptive + 2 <= args.context_prompt_len < args.seq_len:
        raise SdsatConfigError(f"sdsat: --context-prompt-len must lie in [L + 2, --seq-len), got "
                               f"{args.context_prompt_len}")
    if bool(args.adaptive_token_ids) == bool(args.resize_embeddings):
        raise SdsatConfigError("sdsat: give either --adaptive-token-ids or --resize-embeddings N")
    if args.seq_len < args.max_adaptive + 2:
        raise SdsatConfigError(f"sdsat: --seq-len {args.seq_len} is shorter than a span: it needs at least "
                               f"L + 2 = {args.max_adaptive + 2} tokens")
    SdsatConfig((0,), args.max_adaptive, args.num_speculative_tokens)  # checks L and K before loading anything
    targs = TrainingArguments(**{
        "output_dir": args.output, "max_steps": args.max_steps, "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum, "learning_rate": args.lr, "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05, "bf16": args.bf16, "use_cpu": not torch.accelerator.is_available(),
        "dataloader_pin_memory": torch.accelerator.is_available(),
        "logging_steps": args.logging_steps, "save_strategy": "no", "report_to": "none", "seed": args.seed,
        "remove_unused_columns": False, "disable_tqdm": True, **dict(args.training_arg or [])})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise SdsatConfigError(f"sdsat: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                               f"only {vocab}: they do not belong together")
    ids = args.adaptive_token_ids or add_adaptive_rows(model, tokenizer, args.resize_embeddings)
    cfg = SdsatConfig(tuple(ids), args.max_adaptive, args.num_speculative_tokens)
    cfg.check_vocab(model.get_input_embeddings().num_embeddings)
    with targs.main_process_first(desc="tokenize and self-distill"):
        chunks = load_chunks(args.data, tokenizer, args.seq_len, args.data_format, args.cache_dir)
        console.print(f"sdsat train: {len(chunks)} sequences of {args.seq_len} tokens")
        if args.labels == "self":
            needed = args.max_steps * targs.train_batch_size * targs.gradient_accumulation_steps * targs.world_size
            if len(chunks) > needed:  # distill only what training will read
                chunks = chunks.shuffle(seed=args.seed).select(range(needed))
            cache_dir = Path(args.cache_dir or CACHE_DIR)
            if args.self_contexts:
                chunks = self_contexts(chunks, model.to(targs.device), args.self_contexts, args.context_prompt_len,
                                       args.seed, distill_cache_file(cache_dir, args.model, chunks, args, "contexts"),
                                       args.distill_batch_size, args.bf16)
            cache_file = distill_cache_file(cache_dir, args.model, chunks, args)
            chunks = self_distill(chunks, model.to(targs.device), args.max_adaptive, args.spans_per_seq, args.seed,
                                  cache_file, args.distill_batch_size, args.bf16)
    collator = AdaptiveSpanCollator(cfg.adaptive_token_ids, args.max_adaptive, args.spans_per_seq, args.method,
                                    tokenizer.pad_token_id or 0, args.seed)
    trainer = SdsatTrainer(model=model, args=targs, train_dataset=chunks, data_collator=collator,
                           processing_class=tokenizer, adaptive_weight=args.adaptive_weight,
                           callbacks=[ConsoleProgress()])
    return trainer, cfg


def cast_checkpoint(model_dir: Path, dtype: torch.dtype) -> None:
    """Rewrite the floating-point tensors of a saved checkpoint in `dtype`, one shard at a time."""
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, shard,
                  metadata={"format": "pt"})
    cfg_file = model_dir / "config.json"
    hf = json.loads(cfg_file.read_text())
    hf["dtype"] = str(dtype).removeprefix("torch.")
    cfg_file.write_text(json.dumps(hf, indent=2) + "\n")


def save(trainer: SdsatTrainer, args: argparse.Namespace, cfg: SdsatConfig) -> Path:
    """Save model + tokenizer to args.output in the save dtype, with the sdsat block and train_log.json."""
    out = Path(args.output)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        name = args.save_dtype if args.save_dtype != "auto" else AutoConfig.from_pretrained(args.model).dtype
        dtype = getattr(torch, str(name or "float32").removeprefix("torch."))
        if dtype != torch.float32:  # training weights are fp32
            cast_checkpoint(out, dtype)
        cfg.write_into(out)
        (out / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    return out


def run(args: argparse.Namespace) -> Path:
    trainer, cfg = build_trainer(args)
    trainer.train()
    return save(trainer, args, cfg)


def key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_cli(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="base model: directory or hub name (Hugging Face causal LM)")
    a("--data", required=True, help="training data: a .jsonl/.json/.parquet/text file or a glob")
    a("--data-format", default="auto", choices=["auto", "json", "parquet", "text"])
    a("--output", required=True, help="directory for the fine-tuned checkpoint")
    a("--adaptive-token-ids", type=int, nargs="+", metavar="ID", help="existing ids: one (repeated) or one per slot")
    a("--resize-embeddings", type=int, default=0, metavar="N",
      help="instead of existing ids, add N new adaptive tokens and embedding rows (1: repeated, N: per slot)")
    a("--max-adaptive", type=int, default=5, metavar="L", help="longest adaptive span (default 5)")
    a("--spans-per-seq", type=float, default=8.0, metavar="LAMBDA", help="mean spans per sequence (Poisson)")
    a("--adaptive-weight", type=float, default=1.0, metavar="W", help="loss = CE(real) + W * CE(adaptive)")
    a("--num-speculative-tokens", type=int, default=0, metavar="K", help="default K for inference (0: L + 1)")
    a("--method", choices=METHODS, default="sdsat", help="sdsat: masked spans; basic: in-place baseline")
    a("--labels", choices=["data", "self"], default="data",
      help="adaptive labels: the data's next tokens, or the base model's own greedy continuation")
    a("--self-contexts", type=float, default=0.0, metavar="F",
      help="with --labels self: fraction of sequences whose tail is the base model's own greedy continuation")
    a("--context-prompt-len", type=int, default=128, help="data tokens kept before a self-context continuation")
    a("--seq-len", type=int, default=1024)
    a("--max-steps", type=int, default=1000)
    a("--lr", type=float, default=1e-4)
    a("--batch-size", type=int, default=8, help="sequences per device and step")
    a("--grad-accum", type=int, default=1)
    a("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay fp32)")
    a("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation (needs 4D masks)")
    a("--save-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="dtype of the saved weights (auto: the base model's)")
    a("--cache-dir", help=f"datasets and self-distillation cache (default {CACHE_DIR} and datasets' own)")
    a("--distill-batch-size", type=int, default=8)
    a("--logging-steps", type=int, default=10)
    a("--seed", type=int, default=0)
    a("--training-arg", type=key_value, action="append", metavar="KEY=VALUE",
      help="extra transformers TrainingArguments (JSON values), e.g. deepspeed=ds.json; repeatable")
    parser.set_defaults(func=run_cli)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm-sdsat train")
    add_cli(parser)
    return parser.parse_args(argv)


def run_cli(args: argparse.Namespace) -> int:
    console.print(f"sdsat train: saved to {run(args)}")
    return 0
