"""Query a `vllm serve ... --speculative-model sdsat` server with the OpenAI client, then read SDSAT's
acceptance from the server's Prometheus metrics.

    vllm serve examples/models/sdsat-tiny-code --host 127.0.0.1 --port 8000 \\
        --speculative-model sdsat --num-speculative-tokens 4
    python examples/openai_client.py --url http://127.0.0.1:8000 --max-tokens 128

Acceptance is computed from vLLM's counters, over this script's own requests (the difference of
/metrics before and after them; other clients' traffic in between is counted too):
- acceptance length = 1 + accepted / drafts: tokens per verification step, the bonus token included
  (SDSAT's first draft is the target's own next token, so it is at least 2 for greedy requests);
- acceptance rate = accepted / draft tokens, over drafts 1..K;
- acceptance rate over drafts 2..K = (accepted - accepted at position 1) / (draft tokens - drafts): draft 1
  is SDSAT's exact next token, accepted (greedy) always, so this is the rate of the adaptive drafts alone,
  the figure to compare with other methods' acceptance rates;
- per position j: the share of draft steps whose j-th draft was accepted.
"""
import argparse
import sys
import time

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

DEFAULT_PROMPT = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers.
    >>> fibonacci(5)
    [0, 1, 1, 2, 3]
    """
'''


def spec_counters(url: str) -> dict:
    """vllm:spec_decode_* counters from /metrics, summed over engines; per-position counts by position."""
    out = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0, "per_pos": {}}
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix("vllm:spec_decode_")
        if name == family.name:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # skip the _created timestamps
            if name == "num_accepted_tokens_per_pos":
                pos = int(sample.labels["position"])
                out["per_pos"][pos] = out["per_pos"].get(pos, 0.0) + sample.value
            elif name in out:
                out[name] += sample.value
    return out


def acceptance(before: dict, after: dict) -> dict:
    delta = {k: after[k] - before[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    drafts, accepted = delta["num_drafts"], delta["num_accepted_tokens"]
    first = after["per_pos"].get(0, 0.0) - before["per_pos"].get(0, 0.0)
    rest = delta["num_draft_tokens"] - drafts
    per_pos = {p: (after["per_pos"][p] - before["per_pos"].get(p, 0.0)) / drafts
               for p in sorted(after["per_pos"])} if drafts else {}
    return delta | {
        "acceptance_length": 1 + accepted / drafts if drafts else float("nan"),
        "acceptance_rate": accepted / delta["num_draft_tokens"] if drafts else float("nan"),
        "acceptance_rate_after_first": (accepted - first) / rest if rest > 0 and after["per_pos"] else float("nan"),
        "per_position": per_pos,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--stream", action="store_true", help="print the completion as it arrives")
    args = p.parse_args(argv)

    client = OpenAI(base_url=f"{args.url}/v1", api_key="EMPTY", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    before = spec_counters(args.url)
    start = time.monotonic()
    print(f"--- {model}, max_tokens={args.max_tokens}, temperature={args.temperature}\n{args.prompt}", end="")
    if args.stream:
        n_tokens = 0
        for chunk in client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens,
                                               temperature=args.temperature, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices:
                print(chunk.choices[0].text, end="", flush=True)
            if chunk.usage:
                n_tokens = chunk.usage.completion_tokens
    else:
        resp = client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens,
                                         temperature=args.temperature)
        print(resp.choices[0].text, end="")
        n_tokens = resp.usage.completion_tokens
    wall = time.monotonic() - start
    print(f"\n--- {n_tokens} tokens in {wall:.2f} s ({n_tokens / wall:.1f} tokens/s)")

    stats = acceptance(before, spec_counters(args.url))
    if not stats["num_drafts"]:
        print("no vllm:spec_decode_* counts: is the server running with --speculative-model sdsat?")
        return 1
    print(f"drafts {stats['num_drafts']:.0f}, draft tokens {stats['num_draft_tokens']:.0f}, "
          f"accepted {stats['num_accepted_tokens']:.0f}")
    print(f"acceptance length {stats['acceptance_length']:.2f} tokens/step, "
          f"acceptance rate {stats['acceptance_rate']:.1%} (drafts 1..K), "
          f"{stats['acceptance_rate_after_first']:.1%} over drafts 2..K (SDSAT's adaptive drafts)")
    print("accepted per draft position: "
          + ", ".join(f"{pos + 1}: {rate:.1%}" for pos, rate in stats["per_position"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
