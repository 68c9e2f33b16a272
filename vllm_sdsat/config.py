"""The `sdsat` block of a checkpoint's config.json: the contract between training and inference.

    "sdsat": {"adaptive_token_ids": [2], "max_adaptive_tokens": 5, "num_speculative_tokens": 6}

- `adaptive_token_ids`: one id (repeated for every slot, the official release style) or one id per
  slot. Slot j (0-based) uses `ids[min(j, len(ids) - 1)]`.
- `max_adaptive_tokens`: L, the longest adaptive span seen in training.
- `num_speculative_tokens`: K for vLLM = 1 exact draft + (K - 1) adaptive tokens, at most L + 1:
  adaptive slots past L were never trained. With `auto` (vLLM's default for SDSAT, see
  `engine/auto_k.py`) K is the most drafts a request gets, and each step picks 0..K per request.
- `lookup` (a runtime choice, like `auto`; not written by the trainer): "none" (adaptive drafts only),
  "ngram" (hybrid drafting: a request whose last `prompt_lookup_min`..`prompt_lookup_max` tokens
  occurred before in its own tokens takes the lookup draft, see `engine/lookup.py`) or "suffix"
  (refused at startup, see `patches/speculative_config.py`).

`SdsatConfig.resolve` is the one rule that turns a checkpoint's block plus a user's overrides into a
config; the vLLM hook, the proposer, the reference decoder and the benchmark all go through it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

MAX_SPECULATIVE_TOKENS = 16
LOOKUPS = ("none", "ngram", "suffix")
LOOKUP_KEYS = ("lookup", "prompt_lookup_min", "prompt_lookup_max")
# n-gram lengths that make a match "long enough": against 3..5, 2..5 was 5-7% faster at concurrency 1 greedy
# in three interleaved runs and level at 64 in two (docs/benchmarks.md, examples/compare_engines.py)
DEFAULT_LOOKUP_MIN, DEFAULT_LOOKUP_MAX = 2, 5


class SdsatConfigError(ValueError):
    """A bad SDSAT configuration: the message says what and how to fix it."""


@dataclass(frozen=True)
class SdsatConfig:
    adaptive_token_ids: tuple[int, ...]
    max_adaptive_tokens: int
    num_speculative_tokens: int = field(default=0)  # 0: derived as max_adaptive_tokens + 1
    auto: bool = False  # K per request and step, at most num_speculative_tokens
    lookup: str = "none"
    prompt_lookup_min: int = DEFAULT_LOOKUP_MIN
    prompt_lookup_max: int = DEFAULT_LOOKUP_MAX

    def __post_init__(self):
        ids = tuple(int(i) for i in self.adaptive_token_ids)
        object.__setattr__(self, "adaptive_token_ids", ids)
        if not ids:
            raise SdsatConfigError("sdsat: adaptive_token_ids is empty; give at least one token id")
        if any(i < 0 for i in ids):
            raise SdsatConfigError(f"sdsat: adaptive_token_ids must be >= 0, got {list(ids)}")
        if self.max_adaptive_tokens < 1:
            raise SdsatConfigError(f"sdsat: max_adaptive_tokens (L) must be >= 1, got {self.max_adaptive_tokens}")
        if self.num_speculative_tokens == 0:
            object.__setattr__(self, "num_speculative_tokens", self.max_adaptive_tokens + 1)
        k = self.num_speculative_tokens
        if not 2 <= k <= MAX_SPECULATIVE_TOKENS:
            raise SdsatConfigError(
                f"sdsat: num_speculative_tokens (K) must be in 2..{MAX_SPECULATIVE_TOKENS}, got {k} "
                "(K = 1 exact draft + K-1 adaptive tokens)")
        if k > self.max_adaptive_tokens + 1:
            L = self.max_adaptive_tokens
            raise SdsatConfigError(
                f"sdsat: num_speculative_tokens (K={k}) is larger than max_adaptive_tokens (L={L}) + 1: adaptive "
                f"slots past L were never trained, so their drafts are noise. Use K <= {L + 1}, or set "
                "max_adaptive_tokens if the model was trained with longer spans")
        self._check_lookup()

    def _check_lookup(self) -> None:
        if self.lookup not in LOOKUPS:
            raise SdsatConfigError(f"sdsat: lookup must be one of {', '.join(map(repr, LOOKUPS))}, got {self.lookup!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int) or not isinstance(hi, int) \
                or not 1 <= lo <= hi:
            raise SdsatConfigError(f"sdsat: prompt_lookup_min ({lo!r}) and prompt_lookup_max ({hi!r}) must be "
                                   "integers with 1 <= prompt_lookup_min <= prompt_lookup_max")

    def adaptive_id(self, slot: int) -> int:
        """Token id of adaptive slot `slot` (0-based)."""
        return self.adaptive_token_ids[min(slot, len(self.adaptive_token_ids) - 1)]

    def adaptive_ids(self, n: int) -> list[int]:
        return [self.adaptive_id(j) for j in range(n)]

    def check_vocab(self, vocab_size: int) -> "SdsatConfig":
        bad = [i for i in self.adaptive_token_ids if i >= vocab_size]
        if bad:
            raise SdsatConfigError(
                f"sdsat: adaptive token ids {bad} are outside the model's vocabulary (size {vocab_size})")
        return self

    def with_overrides(self, **overrides) -> "SdsatConfig":
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given) if given else self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adaptive_token_ids"] = list(self.adaptive_token_ids)
        if not self.auto:  # a runtime choice: checkpoints written by the trainer do not carry it
            del d["auto"]
        if self.lookup == "none":  # likewise
            for key in LOOKUP_KEYS:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SdsatConfig":
        unknown = set(d) - {"adaptive_token_ids", "max_adaptive_tokens", "num_speculative_tokens", "auto",
                            *LOOKUP_KEYS}
        if unknown:
            raise SdsatConfigError(f"sdsat: unknown keys {sorted(unknown)} in the sdsat block")
        if "adaptive_token_ids" not in d:
            raise SdsatConfigError("sdsat: the sdsat block has no adaptive_token_ids")
        ids = d["adaptive_token_ids"]
        ids = [ids] if isinstance(ids, int) else list(ids)
        k = d.get("num_speculative_tokens", 0)
        auto = bool(d.get("auto", False)) or k == "auto"
        if k == "auto":
            k = 0
        elif isinstance(k, (str, bool)):
            raise SdsatConfigError(f"sdsat: num_speculative_tokens must be an integer or 'auto', got {k!r}")
        lookup = {key: d[key] for key in LOOKUP_KEYS if key in d}
        if "lookup" not in lookup and len(lookup):
            raise SdsatConfigError(f"sdsat: {sorted(lookup)} given without lookup; they set the n-gram lengths of "
                                   "lookup 'ngram' (add \"lookup\": \"ngram\")")
        # One bound given: the other's default moves so that min <= max still holds.
        if isinstance(lookup.get("prompt_lookup_min"), int) and "prompt_lookup_max" not in lookup:
            lookup["prompt_lookup_max"] = max(lookup["prompt_lookup_min"], DEFAULT_LOOKUP_MAX)
        if isinstance(lookup.get("prompt_lookup_max"), int) and "prompt_lookup_min" not in lookup:
            lookup["prompt_lookup_min"] = min(lookup["prompt_lookup_max"], DEFAULT_LOOKUP_MIN)
        return cls(tuple(ids), int(d.get("max_adaptive_tokens", max(1, len(ids)))), int(k), auto, **lookup)

    @classmethod
    def resolve(cls, block: dict | None, overrides: dict | None = None, vocab_size: int | None = None,
                source: str = "the model") -> "SdsatConfig":
        """The one rule: the checkpoint's `sdsat` block, updated by the user's overrides (None values are
        ignored), validated, and checked against the vocabulary when its size is known.

        `source` names the model in the error raised when neither gives adaptive_token_ids.
        """
        merged = dict(block or {})
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        auto = given.get("num_speculative_tokens") == "auto"
        if auto:  # the checkpoint's K stays: it becomes the most drafts a request gets per step
            del given["num_speculative_tokens"]
        merged.update(given)
        if "adaptive_token_ids" not in merged:
            raise SdsatConfigError(
                f"sdsat: {source} has no 'sdsat' block in its config and no adaptive_token_ids were given. "
                "Fine-tune it with `vllm-sdsat train`, or give the adaptive token ids (speculative config key "
                "adaptive_token_ids, or --adaptive-token-ids).")
        cfg = cls.from_dict(merged)
        cfg = replace(cfg, auto=True) if auto else cfg
        return cfg.check_vocab(vocab_size) if vocab_size else cfg

    @classmethod
    def from_pretrained(cls, model_path: str | Path, **overrides) -> "SdsatConfig":
        """`resolve` on `model_path/config.json`'s block; keyword overrides win over it."""
        cfg_file = Path(model_path) / "config.json"
        if not cfg_file.is_file():
            raise SdsatConfigError(f"sdsat: no config.json at {model_path}")
        hf = json.loads(cfg_file.read_text())
        vocab = hf.get("vocab_size") or hf.get("text_config", {}).get("vocab_size")
        return cls.resolve(hf.get("sdsat"), overrides, vocab, source=str(model_path))

    def write_into(self, model_path: str | Path) -> None:
        """Add or replace the `sdsat` block in `model_path/config.json`."""
        cfg_file = Path(model_path) / "config.json"
        hf = json.loads(cfg_file.read_text())
        hf["sdsat"] = self.to_dict()
        cfg_file.write_text(json.dumps(hf, indent=2) + "\n")


def load_preset(path: str | Path) -> tuple[str, dict]:
    """(model, speculative_config) from a YAML preset in configs/: the preset's `sdsat` keys are
    folded into the speculative config, where they override the checkpoint's block. Reads no model."""
    import yaml

    preset = yaml.safe_load(Path(path).read_text())
    spec = dict(preset.get("speculative_config") or {})
    spec.update(preset.get("sdsat") or {})
    if spec.get("method") != "sdsat":
        raise SdsatConfigError(f"sdsat: preset {path} has no speculative_config with method 'sdsat'")
    SdsatConfig.from_dict({k: v for k, v in spec.items() if k != "method"})  # validates the values
    return preset["model"], spec
