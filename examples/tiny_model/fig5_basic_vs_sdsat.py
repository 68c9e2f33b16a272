"""The paper's "basic vs ours" comparison on the tiny model: does training adaptive tokens hurt the
standard tokens?

All runs fine-tune examples/models/tiny-code with the same data, steps, seed and spans:
- basic: adaptive tokens replace real tokens in place, so later real tokens see them (data labels);
- sdsat: spans appended under the 4D mask, so real tokens never see them (data labels);
- sdsat-self: the sdsat layout with self-distilled labels (the base model's own greedy continuation),
  which compares the two label sources at equal steps.
Plotted: loss_real (the real tokens' training loss, in each run's own layout) and, every --eval-every
steps, the standard-token loss of clean held-out code. Also records vllm_sdsat.training.evaluate at the end.
Writes OUT/fig5_basic_vs_sdsat.png and .json. Cost: three training runs of --max-steps steps.

    .venv/bin/python examples/tiny_model/fig5_basic_vs_sdsat.py --max-steps 300
"""
import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib
import torch
from transformers import TrainerCallback

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build  # noqa: E402
from finetune import heldout_sequences, write_train_jsonl  # noqa: E402

from vllm_sdsat.training import train  # noqa: E402
from vllm_sdsat.training.evaluate import evaluate, standard_loss  # noqa: E402

RUNS = {"basic": ("basic", "data"), "sdsat": ("sdsat", "data"), "sdsat-self": ("sdsat", "self")}


class HeldOutLoss(TrainerCallback):
    """Standard-token loss on clean held-out sequences at step 0 and every `every` steps."""

    def __init__(self, sequences: torch.Tensor, every: int):
        self.sequences, self.every, self.points = sequences, every, []

    def record(self, model, step):
        model.eval()
        self.points.append({"step": step, "heldout_loss": round(standard_loss(model, self.sequences)[0], 4)})
        model.train()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.record(model, state.global_step)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(build.MODELS / "tiny-code"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-sequences", type=int, default=32)
    ap.add_argument("--logging-steps", type=int, default=5, help="steps averaged per training-loss point")
    ap.add_argument("--max-adaptive", type=int, default=6, metavar="L")
    ap.add_argument("--spans-per-seq", type=float, default=16.0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = {"settings": vars(args), "runs": {}}
    sequences = None
    ids = [str(i) for i in range(2, 2 + args.max_adaptive)]
    for name, (method, labels) in RUNS.items():
        argv = ["--model", args.base, "--data", str(write_train_jsonl()), "--method", method, "--labels", labels,
                "--output", str(build.WORK / f"fig5-{name}"), "--adaptive-token-ids", *ids,
                "--max-adaptive", str(args.max_adaptive), "--spans-per-seq", str(args.spans_per_seq),
                "--seq-len", str(args.seq_len), "--max-steps", str(args.max_steps), "--lr", str(args.lr),
                "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--bf16",
                "--logging-steps", str(args.logging_steps), "--cache-dir", str(build.WORK / "cache")]
        trainer, sdsat = train.build_trainer(train.parse_args(argv))
        if sequences is None:
            sequences = heldout_sequences(trainer.processing_class, args.eval_sequences, args.seq_len)
        heldout = HeldOutLoss(sequences, args.eval_every)
        trainer.add_callback(heldout)
        trainer.train()
        trainer.model.eval()
        results["runs"][name] = {
            "train": [{k: e[k] for k in ("step", "loss_real", "loss_adaptive")}
                      for e in trainer.state.log_history if "loss_real" in e],
            "heldout": heldout.points,
            "final_eval": evaluate(trainer.model, sequences, sdsat, seed=args.seed),
        }
        print(name, json.dumps(results["runs"][name]["final_eval"]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, color in zip(RUNS, ("tab:red", "tab:blue", "tab:green")):
        run = results["runs"][name]
        ax.plot([e["step"] for e in run["train"]], [e["loss_real"] for e in run["train"]], color=color, alpha=0.35,
                label=f"{name}: training loss of real tokens")
        ax.plot([p["step"] for p in run["heldout"]], [p["heldout_loss"] for p in run["heldout"]], "o-", color=color,
                label=f"{name}: held-out standard-token loss")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("Standard tokens while training adaptive tokens: basic vs SDSAT (tiny-code)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig5_basic_vs_sdsat.png", dpi=120)
    (out / "fig5_basic_vs_sdsat.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'fig5_basic_vs_sdsat.png'}")


if __name__ == "__main__":
    main()
