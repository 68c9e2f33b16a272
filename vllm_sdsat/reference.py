"""Reference SDSAT decoder: the paper's draft-then-verify loop in plain PyTorch/transformers.

An SDSAT model drafts its own future tokens: k "adaptive" tokens appended after the last sampled
token t0 each predict a token further ahead. Every loop is two forward passes:

    draft pass   [t0, A, ..., A]         -> x1 (the exact next token), drafts d2 .. d_{k+1}
    verify pass  [x1, d2, ..., d_{k+1}]  -> keep the drafts the target agrees with, plus one token of its own

so a loop yields between 2 and k + 2 tokens. Greedy output equals `model.generate(do_sample=False)`.
Sampling verifies the drafts with modified rejection sampling (speculative sampling, arXiv 2302.01318),
so the output follows the target's distribution exactly, for any temperature, top-k and top-p.

Counting: vLLM's K (`num_speculative_tokens`) counts x1 too, so K = 1 + k and by default k = K - 1.

Cost: batch size 1, one DynamicCache, two passes of k + 1 tokens per loop; the KV of adaptive tokens and
rejected drafts is cropped away, nothing else is kept. This is the oracle for tests and the algorithm
as written, not the fast path (that is the vLLM plugin).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from vllm_sdsat.config import SdsatConfig, SdsatConfigError
from vllm_sdsat.console import console


@dataclass
class DecodeStats:
    """What one generate call did. A loop is one draft pass and, unless x1 ended the request, one verify pass."""
    k: int                          # adaptive tokens per draft pass (0: plain decoding)
    new_tokens: int = 0
    loops: int = 0
    forward_passes: int = 0         # not counting the prefill
    drafted: int = 0                # adaptive drafts checked by a verify pass (x1 is exact, never checked)
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: loops where draft d_{j+2} was kept
    wall_time_s: float = 0.0        # prefill included

    @property
    def tokens_per_loop(self) -> float:
        """New tokens per loop: 2 + accepted drafts for a full loop (the final loop may be cut short)."""
        return self.new_tokens / max(self.loops, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def acceptance_per_position(self) -> list[float]:
        verifications = max(self.drafted // max(self.k, 1), 1)
        return [n / verifications for n in self.accepted_per_position]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.wall_time_s, 1e-9)

    def summary(self) -> str:
        lines = [f"new tokens {self.new_tokens}, loops {self.loops}, forward passes {self.forward_passes}, "
                 f"{self.wall_time_s:.2f} s ({self.tokens_per_s:.1f} tokens/s)"]
        if self.k:
            lines.append(f"k={self.k}: {self.tokens_per_loop:.2f} tokens per loop, accepted {self.accepted}/"
                         f"{self.drafted} drafts ({self.acceptance_rate:.1%}), per position "
                         + " ".join(f"{a:.2f}" for a in self.acceptance_per_position))
        return "\n".join(lines)


class Sampler:
    """Logits -> tokens as model.generate picks them: argmax at temperature 0; otherwise a seeded draw
    from the softmax after temperature, top-k and top-p (the same warpers, in the same order)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 device: torch.device | str = "cpu"):
        check_arguments(temperature=temperature, top_p=top_p, top_k=top_k)
        self.greedy = temperature == 0
        self.warpers = LogitsProcessorList(
            ([] if temperature in (0, 1) else [TemperatureLogitsWarper(temperature)])
            + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
            + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
        self.generator = torch.Generator(device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, V] logits -> [n, V] processed probabilities."""
        return self.warpers(None, logits.float()).softmax(-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row, and the distribution it was drawn from (None when greedy)."""
        if self.greedy:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return self.draw(probs), probs


def verify_greedy(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Accept the longest prefix of drafts equal to the target's argmax; the target's next choice follows.

    target_logits[i] is the target's prediction after x1, d2, ..., so it checks drafts[i]."""
    target = target_logits.argmax(-1)
    n_accepted = int((drafts == target[:-1]).cumprod(0).sum())
    return n_accepted, int(target[n_accepted])


def accept(p: float, q: float, generator: torch.Generator) -> bool:
    """Modified rejection sampling: keep a draft drawn from q with probability min(1, p / q)."""
    return torch.rand((), generator=generator, device=generator.device).item() < min(1.0, p / q)


def verify_sampled(drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   sampler: Sampler) -> tuple[int, int]:
    """Speculative sampling: the returned tokens follow the target distribution whatever q is.

    On the first rejection the replacement comes from norm(max(0, p - q)), the part of p that q
    under-proposed; when every draft is kept, a bonus token comes from p after the last one."""
    for i, token in enumerate(drafts.tolist()):
        p, q = target_probs[i], draft_probs[i]
        if not accept(p[token].item(), q[token].item(), sampler.generator):
            residual = (p - q).clamp_min(0)
            return i, int(sampler.draw(residual / residual.sum()))
    return len(drafts), int(sampler.draw(target_probs[-1]))


@torch.no_grad()
def sdsat_generate(model, input_ids, sdsat: SdsatConfig | Sequence[int] | int | None = None, k: int | None = None,
                   max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   seed: int | None = None, eos_token_id: int | Sequence[int] | None = None
                   ) -> tuple[list[int], DecodeStats]:
    """Generate with the SDSAT loop; returns the new token ids (prompt excluded) and statistics.

    sdsat: an SdsatConfig, adaptive token id(s), or None to read the `sdsat` block of model.config.
    k: adaptive tokens per draft pass; None means the config's num_speculative_tokens - 1
       (plain ids make a config with K = len(ids) + 1, so k = len(ids)).
    eos_token_id: None means model.generation_config.eos_token_id; [] never stops early.
    """
    cfg = resolve_sdsat_config(model, sdsat)
    k = cfg.num_speculative_tokens - 1 if k is None else k
    check_arguments(k, max_new_tokens)
    sampler, stop_ids, prompt = _setup(model, input_ids, temperature, top_p, top_k, seed, eos_token_id)
    adaptive = torch.tensor(cfg.adaptive_ids(k), device=model.device)
    stats = DecodeStats(k=k, accepted_per_position=[0] * k)
    start = time.perf_counter()
    cache, t0 = _prefill(model, prompt)
    out: list[int] = []
    while True:
        # Draft pass. Attention is causal, so t0's output cannot see the adaptive tokens: x1 is exact.
        n = cache.get_seq_length()
        tokens, draft_probs = sampler.pick(_forward(model, torch.cat([t0, adaptive]), cache))
        _crop(cache, n + 1)  # keep t0's KV; the adaptive tokens' KV is never reused
        stats.loops += 1
        stats.forward_passes += 1
        if _extend(out, tokens[:1].tolist(), max_new_tokens, stop_ids):
            break  # x1 alone ends the request: nothing left to verify

        # Verify pass over [x1, d2, ..., d_{k+1}]: the target's own prediction after each of them.
        drafts = tokens[1:]
        target_logits = _forward(model, tokens, cache)
        if sampler.greedy:
            n_accepted, next_token = verify_greedy(drafts, target_logits)
        else:
            n_accepted, next_token = verify_sampled(drafts, draft_probs[1:], sampler.probs(target_logits), sampler)
        _crop(cache, n + 2 + n_accepted)  # t0, x1 and the accepted drafts; next_token is the new t0
        stats.forward_passes += 1
        stats.drafted += k
        stats.accepted += n_accepted
        for j in range(n_accepted):
            stats.accepted_per_position[j] += 1
        if _extend(out, drafts[:n_accepted].tolist() + [next_token], max_new_tokens, stop_ids):
            break
        t0 = torch.tensor([next_token], device=model.device)
    stats.new_tokens = len(out)
    stats.wall_time_s = time.perf_counter() - start
    return out, stats


@torch.no_grad()
def autoregressive_generate(model, input_ids, max_new_tokens: int = 128, temperature: float = 0.0,
                            top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                            eos_token_id: int | Sequence[int] | None = None) -> tuple[list[int], DecodeStats]:
    """Plain decoding with the same cache and sampler, one pass per token: the baseline for DecodeStats."""
    check_arguments(max_new_tokens=max_new_tokens)
    sampler, stop_ids, prompt = _setup(model, input_ids, temperature, top_p, top_k, seed, eos_token_id)
    stats = DecodeStats(k=0)
    start = time.perf_counter()
    cache, token = _prefill(model, prompt)
    out: list[int] = []
    while True:
        token, _ = sampler.pick(_forward(model, token, cache))
        stats.loops += 1
        stats.forward_passes += 1
        if _extend(out, token.tolist(), max_new_tokens, stop_ids):
            break
    stats.new_tokens = len(out)
    stats.wall_time_s = time.perf_counter() - start
    return out, stats


def resolve_sdsat_config(model, sdsat: SdsatConfig | Sequence[int] | int | None) -> SdsatConfig:
    """An SdsatConfig from a config, adaptive token id(s), or (None) the model config's `sdsat` block, through
    the one rule, `SdsatConfig.resolve`. Plain ids ignore the model's block: L = len(ids), K = L + 1."""
    vocab = model.get_input_embeddings().num_embeddings
    if sdsat is None:
        return SdsatConfig.resolve(getattr(model.config, "sdsat", None), {}, vocab, source="the model config")
    block = sdsat.to_dict() if isinstance(sdsat, SdsatConfig) else {"adaptive_token_ids": sdsat}
    return SdsatConfig.resolve(block, {}, vocab, source="the model config")


def check_arguments(k: int | None = None, max_new_tokens: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0) -> None:
    """Raise a one-line SdsatConfigError (a ValueError) for a bad request; k=None is not checked."""
    if k is not None and k < 1:
        raise SdsatConfigError(f"k (adaptive tokens per draft pass) must be >= 1, got {k}")
    if max_new_tokens < 1:
        raise SdsatConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise SdsatConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise SdsatConfigError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise SdsatConfigError(f"top_k must be >= 0 (0 = off), got {top_k}")


def _setup(model, input_ids, temperature, top_p, top_k, seed, eos_token_id):
    """Return the sampler, the stop ids and the prompt as a 1-D tensor."""
    prompt = torch.as_tensor(input_ids, device=model.device).long()
    if prompt.dim() == 2 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise SdsatConfigError(f"input_ids must be one non-empty sequence (batch size 1), "
                               f"got shape {tuple(prompt.shape)}")
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    stop_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    return Sampler(temperature, top_p, top_k, seed, model.device), stop_ids, prompt


def _prefill(model, prompt: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Cache all prompt tokens but the last, which becomes t0 (the last token not yet in the cache)."""
    cache = DynamicCache(config=model.config)
    if prompt.numel() > 1:
        _forward(model, prompt[:-1], cache)
    return cache, prompt[-1:]


def _forward(model, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run 1-D `ids` after what the cache holds (positions follow on); [len(ids), V] fp32 logits."""
    return model(input_ids=ids[None], past_key_values=cache, use_cache=True).logits[0].float()


def _crop(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # negative: remove this many (a positive argument is a length in older transformers)


def _extend(out: list[int], tokens: list[int], max_new_tokens: int, stop_ids: set[int]) -> bool:
    """Append tokens up to the budget or a stop token (kept, as model.generate does); True when done."""
    for token in tokens:
        out.append(token)
        if token in stop_ids or len(out) == max_new_tokens:
            return True
    return False


def add_cli(parser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--k", type=int, default=None,
                        help="adaptive tokens per draft pass (default: the sdsat block's num_speculative_tokens - 1, "
                             "since K counts the exact draft x1 too)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--adaptive-token-ids", type=int, nargs="+", default=None,
                        help="override the sdsat block (required for a model without one)")
    parser.add_argument("--baseline", action="store_true", help="also decode without speculation and compare speed")
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_arguments(args.k, args.max_new_tokens, args.temperature, args.top_p, args.top_k)  # before the slow load
    cfg = SdsatConfig.from_pretrained(args.model, adaptive_token_ids=args.adaptive_token_ids)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompt = tokenizer(args.prompt)["input_ids"]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed, eos_token_id=tokenizer.eos_token_id)
    ids, stats = sdsat_generate(model, prompt, cfg, args.k, **sampling)
    console.print(args.prompt + tokenizer.decode(ids))
    console.print(f"\n[sdsat] {stats.summary()}")
    if args.baseline:
        _, base = autoregressive_generate(model, prompt, **sampling)
        console.print(f"[plain] {base.summary()}")
        console.print(f"[speedup] {stats.tokens_per_s / base.tokens_per_s:.2f}x")
    return 0
