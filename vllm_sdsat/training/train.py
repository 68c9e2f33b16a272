"""SDSAT fine-tuning: a Hugging Face Trainer whose batches carry adaptive spans (see data.py).

    vllm-sdsat train --model BASE --data train.jsonl --adaptive-token-ids 2 --max-adaptive 5 --output OUT

Loss = CE(real tokens) + w * CE(adaptive tokens); both parts are logged (loss_real, loss_adaptive).
With --soft-targets, adaptive tokens in sampled self-contexts take KL(p || q) instead of CE (soft_target_loss).
Being a plain `Trainer`, it runs unchanged under accelerate / torchrun / DeepSpeed / FSDP; pass extra
TrainingArguments with --training-arg KEY=VALUE. The output is a normal checkpoint (model, tokenizer)
whose config.json carries the `sdsat` block that inference reads.

--labels self (self-distillation), --self-contexts F and --self-context-temperatures: see self_distill.py.
The generation is sharded over the ranks of a distributed run; every rank then loads all shards.

Checkpoints: --save-steps N writes OUT/checkpoint-N every N steps (optimizer, scheduler, RNG states
and the step); --resume continues from the last one in OUT (or from a given checkpoint folder).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
from collections import defaultdict
from itertools import chain
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, load_dataset
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback,
                          TrainingArguments)

from vllm_sdsat.config import SdsatConfig, SdsatConfigError
from vllm_sdsat.console import console
from vllm_sdsat.paths import CACHE_DIR
from vllm_sdsat.training.data import IGNORE, METHODS, AdaptiveSpanCollator, forward_inputs
from vllm_sdsat.training.self_distill import (distill_cache_file, greedy_at_anchors, self_contexts,  # noqa: F401
                                              self_distill)

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


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not IGNORE (0 when there are none)."""
    keep = labels != IGNORE
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum") / keep.sum().clamp(min=1)


def soft_target_loss(logits: torch.Tensor, position_ids: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_T || q_T) over the adaptive tokens whose soft temperature T is > 0 (0 when there are none).

    q is the slot's distribution; p the model's own, detached, at the real token with the slot's position
    id (both predict the token after it), along the sampled continuation; both at temperature T, as a
    draft is drawn and verified at T. Lossless acceptance of a draft from q is 1 - TV(p, q).
    """
    keep = temperature > 0
    t = temperature[keep][:, None]
    p = logits[keep.nonzero()[:, 0], position_ids[keep]].detach().float() / t
    q = logits[keep].float() / t
    kl = F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="sum")
    return kl / keep.sum().clamp(min=1)


class SdsatTrainer(Trainer):
    """Trainer with loss = CE(real) + adaptive_weight * CE(adaptive) on AdaptiveSpanCollator batches;
    adaptive tokens with a soft target count their soft_target_loss instead of a CE (the mean is over both).

    The parts are averaged over the steps since the last log (and over processes) and logged as
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
        soft_t = inputs.get("soft_temperature")
        if soft_t is not None and soft_t.any():
            soft = soft_target_loss(outputs.logits, inputs["position_ids"], soft_t)
            hard_n, soft_n = (inputs["adaptive_labels"] != IGNORE).sum(), (soft_t > 0).sum()
            adaptive = (adaptive * hard_n + soft * soft_n) / (hard_n + soft_n)
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


class SpanEpoch(TrainerCallback):
    """Tells the collator the epoch, so an example's spans differ between epochs but not between a run and
    its resumption (its seed is (seed, epoch, example index), not a running generator)."""

    def __init__(self, collator: AdaptiveSpanCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)


def barrier() -> None:
    """Wait for every rank of a distributed run (a no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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
    if min(args.self_context_temperatures) < 0:
        raise SdsatConfigError(f"sdsat: --self-context-temperatures must be >= 0, got {args.self_context_temperatures}")
    if args.self_context_temperatures != [0.0] and not args.self_contexts:
        raise SdsatConfigError("sdsat: --self-context-temperatures needs --self-contexts F")
    if args.soft_targets and not (args.self_contexts and max(args.self_context_temperatures) > 0):
        raise SdsatConfigError("sdsat: --soft-targets needs sampled self-contexts (--self-contexts F and a "
                               "--self-context-temperatures value above 0)")
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
    if not 0 <= args.warmup_ratio < 1:
        raise SdsatConfigError(f"sdsat: --warmup-ratio is a fraction in [0, 1), got {args.warmup_ratio}")
    targs = TrainingArguments(**{
        "output_dir": args.output, "max_steps": args.max_steps, "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum, "learning_rate": args.lr, "lr_scheduler_type": "cosine",
        # whole steps: a float warmup_steps is a ratio only on transformers >= 5 (4.x reads 0.05 as 0.05 steps)
        "warmup_steps": math.ceil(args.warmup_ratio * args.max_steps), "bf16": args.bf16,
        "use_cpu": not torch.accelerator.is_available(), "dataloader_pin_memory": torch.accelerator.is_available(),
        "logging_steps": args.logging_steps, "report_to": "none", "seed": args.seed,
        "save_strategy": "steps" if args.save_steps else "no", "save_steps": args.save_steps or 500,
        "save_total_limit": args.save_total_limit, "remove_unused_columns": False, "disable_tqdm": True,
        **dict(args.training_arg or [])})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise SdsatConfigError(f"sdsat: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                               f"only {vocab}: they do not belong together")
    ids = args.adaptive_token_ids or add_adaptive_rows(model, tokenizer, args.resize_embeddings)
    cfg = SdsatConfig.resolve(None, {"adaptive_token_ids": ids, "max_adaptive_tokens": args.max_adaptive,
                                     "num_speculative_tokens": args.num_speculative_tokens},
                              model.get_input_embeddings().num_embeddings, source=args.model)
    with targs.main_process_first(desc="tokenize"):
        chunks = load_chunks(args.data, tokenizer, args.seq_len, args.data_format, args.cache_dir)
    console.print(f"sdsat train: {len(chunks)} sequences of {args.seq_len} tokens")
    if args.labels == "self":
        needed = args.max_steps * targs.train_batch_size * targs.gradient_accumulation_steps * targs.world_size
        if len(chunks) > needed:  # distill only what training will read
            chunks = chunks.shuffle(seed=args.seed).select(range(needed))
        cache_dir = Path(args.cache_dir or CACHE_DIR)
        shards = {"rank": targs.process_index, "world": targs.world_size, "barrier": barrier}  # each rank its share
        if args.self_contexts:
            chunks = self_contexts(chunks, model.to(targs.device), args.self_contexts, args.context_prompt_len,
                                   args.seed, distill_cache_file(cache_dir, args.model, chunks, args, "contexts"),
                                   args.distill_batch_size, args.bf16, **shards,
                                   temperatures=args.self_context_temperatures)
        cache_file = distill_cache_file(cache_dir, args.model, chunks, args)
        chunks = self_distill(chunks, model.to(targs.device), args.max_adaptive, args.spans_per_seq, args.seed,
                              cache_file, args.distill_batch_size, args.bf16, **shards)
    chunks = chunks.add_column("index", list(range(len(chunks))))  # per-example span seeds (data.py)
    collator = AdaptiveSpanCollator(cfg.adaptive_token_ids, args.max_adaptive, args.spans_per_seq, args.method,
                                    tokenizer.pad_token_id or 0, args.seed, args.soft_targets)
    trainer = SdsatTrainer(model=model, args=targs, train_dataset=chunks, data_collator=collator,
                           processing_class=tokenizer, adaptive_weight=args.adaptive_weight,
                           callbacks=[ConsoleProgress(), SpanEpoch(collator)])
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
    resume = args.resume
    if resume == "last" and not list(Path(args.output).glob("checkpoint-*")):
        raise SdsatConfigError(f"sdsat: --resume: no checkpoint-* folder in {args.output} to resume from")
    if resume not in (None, "last") and not Path(resume).is_dir():
        raise SdsatConfigError(f"sdsat: --resume: no checkpoint folder at {resume}")
    trainer, cfg = build_trainer(args)
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    out = save(trainer, args, cfg)
    barrier()  # ranks leave together, without a process group: one left to exit can abort a rank (gloo)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


def key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


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
    a("--self-context-temperatures", type=floats, default=[0.0], metavar="T1,T2,..",
      help="temperatures of the self-context continuations, one drawn per sequence (default 0: greedy)")
    a("--soft-targets", action="store_true",
      help="adaptive slots in sampled self-contexts learn the model's own distribution at the context's "
           "temperature (KL), not a greedy token")
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
    a("--warmup-ratio", type=float, default=0.05, help="linear warmup over this fraction of --max-steps")
    a("--save-steps", type=int, default=0, metavar="N", help="write OUT/checkpoint-N every N steps (0: none)")
    a("--save-total-limit", type=int, default=None, metavar="M", help="keep only the last M checkpoints")
    a("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
      help="continue from the last checkpoint in --output, or from the given checkpoint folder")
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
