"""Self-distillation data for SDSAT training: the frozen base model's own greedy tokens.

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
--self-context-temperatures T1,T2,..: each chosen sequence is continued at one of these temperatures
(drawn per sequence; 0 = greedy), so the slots also see the sampled output they meet at T > 0. The
sequence keeps its temperature (column `temperature`) for the soft targets of train.py.

Both run sharded: with several ranks (torchrun / accelerate), each rank generates a contiguous share of
the sequences into its own cache file; then every rank loads the concatenation (map_sharded).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets

from vllm_sdsat.config import SdsatConfigError
from vllm_sdsat.console import console
from vllm_sdsat.training.data import attention_bias, sample_anchors


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


def pick(logits: torch.Tensor, temperatures: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens: the argmax where the row's temperature is 0, else a draw from
    softmax(logits / T) (Gumbel-max, one generator per row: a row's draws do not depend on its batch)."""
    gumbel = torch.stack([-torch.empty(logits.shape[-1]).exponential_(generator=g).log() for g in generators])
    t = temperatures[:, None].to(logits.device)
    return torch.where(t > 0, logits.float() / t.clamp(min=1e-6) + gumbel.to(logits.device), logits.float()).argmax(-1)


@torch.inference_mode()
def continuation(model, prompts: torch.Tensor, steps: int, temperatures: torch.Tensor | None = None,
                 generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """(B, steps) tokens after equal-length prompts (B, P), with a KV cache; EOS does not stop it.
    Row b is greedy when temperatures[b] is 0 (the default), else sampled at that temperature."""
    B = prompts.shape[0]
    temperatures = torch.zeros(B) if temperatures is None else temperatures
    generators = generators or [torch.Generator().manual_seed(b) for b in range(B)]
    out = model(input_ids=prompts.to(model.device), use_cache=True, logits_to_keep=1)
    tokens = [pick(out.logits[:, -1], temperatures, generators)[:, None]]
    for _ in range(steps - 1):
        out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(pick(out.logits[:, -1], temperatures, generators)[:, None])
    return torch.cat(tokens, dim=1).cpu()


def self_contexts(chunks: Dataset, model, fraction: float, prompt_len: int, seed: int, cache_file: Path,
                  batch_size: int = 8, bf16: bool = False, rank: int = 0, world: int = 1, barrier=None,
                  temperatures: tuple[float, ...] = (0.0,)) -> Dataset:
    """In a `fraction` of the sequences (drawn per index), replace the tokens after the first
    prompt_len by the model's continuation of those prompt_len tokens, at a temperature drawn per index
    from `temperatures` (0: greedy). Adds the columns `real_until` (how many leading tokens are data: the
    whole sequence where nothing was replaced) and `temperature` (0 where nothing was replaced).

    Runs like self_distill: frozen model, batched, sharded over ranks, cached as Arrow files.
    """
    def continue_some(batch, indices):
        rows = [list(x) for x in batch["input_ids"]]
        rngs = {b: np.random.default_rng([seed, i, 1]) for b, i in enumerate(indices)}
        chosen = [b for b, rng in rngs.items() if rng.random() < fraction]
        real_until, temps = [len(x) for x in rows], [0.0] * len(rows)
        if chosen:
            for b in chosen:
                temps[b] = float(temperatures[rngs[b].integers(len(temperatures))])
            prompts = torch.tensor([rows[b][:prompt_len] for b in chosen])
            generators = [torch.Generator().manual_seed(int(rngs[b].integers(2 ** 62))) for b in chosen]
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                tails = continuation(model, prompts, len(rows[chosen[0]]) - prompt_len,
                                     torch.tensor([temps[b] for b in chosen]), generators)
            for b, tail in zip(chosen, tails.tolist()):
                rows[b][prompt_len:] = tail
                real_until[b] = prompt_len
        return {"input_ids": rows, "real_until": real_until, "temperature": temps}

    features = Features({**chunks.features, "real_until": Value("int32"), "temperature": Value("float32")})
    return map_sharded(chunks, continue_some, model, features, cache_file, batch_size,
                       "self-contexts: the model's continuations", rank, world, barrier)


def self_distill(chunks: Dataset, model, max_adaptive: int, spans_per_seq: float, seed: int, cache_file: Path,
                 batch_size: int = 8, bf16: bool = False, rank: int = 0, world: int = 1, barrier=None) -> Dataset:
    """Add columns `anchors` (Poisson(spans_per_seq) uniform anchors per sequence) and `greedy`
    (per anchor, the model's greedy tokens x^_{a+2}..x^_{a+1+L}: the labels of slots 1..L).

    Runs the model (frozen, eval mode, bf16 autocast if asked) once over the data, batched, with a
    progress bar, each of `world` ranks on its own shard (map_sharded); cached as Arrow files.
    """
    def add_labels(batch, indices):
        anchors = [sample_anchors(np.random.default_rng([seed, i]), len(x), spans_per_seq)
                   for i, x in zip(indices, batch["input_ids"])]
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            greedy = greedy_at_anchors(model, torch.tensor(batch["input_ids"]), anchors, max_adaptive)
        return {"anchors": anchors, "greedy": [[g[1:] for g in row] for row in greedy]}

    features = Features({**chunks.features, "anchors": Sequence(Value("int32")),
                         "greedy": Sequence(Sequence(Value("int32")))})
    return map_sharded(chunks, add_labels, model, features, cache_file, batch_size,
                       "self-distillation: greedy labels", rank, world, barrier)


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's contiguous share of n rows; sizes differ by at most one."""
    div, mod = divmod(n, world)
    return [(r * div + min(r, mod), (r + 1) * div + min(r + 1, mod)) for r in range(world)]


def shard_file(cache_file: Path, rank: int, world: int) -> Path:
    return cache_file.with_name(f"{cache_file.stem}-{rank}of{world}.arrow")


def map_sharded(chunks: Dataset, fn, model, features: Features, cache_file: Path, batch_size: int, desc: str,
                rank: int = 0, world: int = 1, barrier=None) -> Dataset:
    """chunks.map(fn) split over `world` ranks: this rank maps its contiguous shard (fn sees global row
    indices, so the result does not depend on world) into its own Arrow file next to cache_file, or reuses
    the file when it exists. After `barrier()` every rank loads all shards, concatenated in order.
    Across nodes, cache_file must lie on a filesystem every rank can read."""
    bounds = shard_bounds(len(chunks), world)
    start, end = bounds[rank]
    if end > start:
        map_with_frozen_model(chunks.select(range(start, end)), fn, model, features,
                              shard_file(cache_file, rank, world), batch_size, desc, offset=start, show=rank == 0)
    if barrier is not None:
        barrier()
    files = [shard_file(cache_file, r, world) for r, (s, e) in enumerate(bounds) if e > s]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SdsatConfigError(f"sdsat: self-distillation shards {missing} are missing on rank {rank}: the cache "
                               "directory (--cache-dir) must be on a filesystem that every rank can read")
    return concatenate_datasets([Dataset.from_file(str(f)) for f in files])


def map_with_frozen_model(chunks: Dataset, fn, model, features: Features, cache_file: Path, batch_size: int,
                          desc: str, offset: int = 0, show: bool = True) -> Dataset:
    """chunks.map(fn) in batches with indices (+ offset), the model in eval mode, cached as an Arrow file."""
    was_training = model.training
    model.eval()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with console.bar(total=len(chunks), desc=desc, unit="seq", disable=not show) as bar:
        def fn_with_progress(batch, indices):
            out = fn(batch, [offset + i for i in indices])
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
    temperatures = [] if args.self_context_temperatures == [0.0] else [args.self_context_temperatures]  # old keys hold
    key = [str(model_dir.resolve()) if files else model_path,
           [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()],
           chunks._fingerprint, args.max_adaptive, args.spans_per_seq, args.seed, args.bf16, args.self_contexts,
           args.context_prompt_len, *temperatures]
    return cache_dir / f"{kind}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]}.arrow"
