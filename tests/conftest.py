"""Shared fixtures: small models to test against."""
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

# vLLM engines in the tests: a small KV cache, and nothing that tries the network.
for _key, _value in {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
TINY_CODE = REPO / "examples" / "models" / "tiny-code"


@pytest.fixture
def random_llama():
    """Factory for a randomly initialised fp32 Llama; `init` scales the weights (logit sharpness)."""
    def make(vocab_size=64, hidden=32, layers=2, heads=2, init=0.02, seed=0, **config):
        torch.manual_seed(seed)
        config = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False) | config
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=2048, initializer_range=init, **config)
        return LlamaForCausalLM(cfg).eval()
    return make


@pytest.fixture(scope="session")
def tiny_code():
    """The embedded base model (examples/models/tiny-code) in fp32 and its tokenizer; skips if not built."""
    if not (TINY_CODE / "config.json").is_file():
        pytest.skip(f"{TINY_CODE.relative_to(REPO)} is not built yet (examples/tiny_model/build.py)")
    model = AutoModelForCausalLM.from_pretrained(TINY_CODE, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(TINY_CODE)
