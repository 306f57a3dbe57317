"""Proxy-tuning / EFT and VAS steering (lmadapt.steering) on tiny random models.

Every check compares the cached lockstep decoder against the formula computed by hand from each model's own
uncached full-sequence outputs: ``log_softmax(z_base) + sum_i w_i (log_softmax(z_ft_i) - log_softmax(z_ref_i))``
and, for VAS, ``+ sum_j beta_j (V_j(prefix + a) - mean_K V_j)`` on the top-k set K. Tolerances are fp32's.
"""

from __future__ import annotations

import contextlib
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmadapt.decoding.generation import encode_prompt, generate, seeded, stop_token_ids
from lmadapt.decoding.steered_scoring import proxy_logprobs, proxy_score_continuations
from lmadapt.decoding.steering import (
    ModelTerm,
    ValueTerm,
    proxy_terms,
    sample_next,
    steer_ids,
    steered_generate,
)
from lmadapt.decoding.value_model import ValueModel
from lmadapt.errors import LmadaptError
from lmadapt.methods import build_method
from lmadapt.models.tree import adapters_disabled
from lmadapt.models.vocab import check_vocabularies
from lmadapt.testing import SPECIAL_TOKENS, tiny_llama, tiny_tokenizer

ATOL = 1e-5  # fp32 log-probabilities after a few matmuls
V = 260  # the tiny tokenizer's size
PROMPTS = ["Hello world", "A", "The quick brown fox jumps", "xyz"]


class StandInValue(nn.Module):
    """The ValueModel forward contract: a tiny Llama backbone, a linear head, plus an optional planted value
    per last token (``planted[a]`` is added wherever token ``a`` is the input)."""

    def __init__(self, seed: int = 5, head_std: float = 1.0, shift: float = 0.0,
                 planted: dict[int, float] | None = None) -> None:
        super().__init__()
        self.backbone = tiny_llama(seed=seed).model
        self.head = nn.Linear(64, 1)
        with torch.no_grad():
            self.head.weight.normal_(std=head_std, generator=torch.Generator().manual_seed(seed))
            self.head.bias.fill_(shift)
        table = torch.zeros(V)
        for token, value in (planted or {}).items():
            table[token] = value
        self.register_buffer("planted", table)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache)
        values = self.head(out.last_hidden_state).squeeze(-1) + self.planted[input_ids]
        return SimpleNamespace(values=values, past_key_values=out.past_key_values)


# --- helpers ---------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def trio() -> tuple[nn.Module, nn.Module, nn.Module]:
    """(large base, expert, anti-expert): three different random tiny Llamas."""
    return tiny_llama(seed=0), tiny_llama(seed=1), tiny_llama(seed=2)


def lora_expert(seed: int = 1) -> nn.Module:
    """A tiny Llama with a LoRA whose B is random, so the adapter changes the outputs."""
    model = tiny_llama(seed=seed)
    build_method({"name": "lora", "r": 4, "alpha": 8, "init": "random"}).apply(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(7))
    return model.eval()


@torch.inference_mode()
def logp(model: nn.Module, ids: list[int], adapters_off: bool = False) -> torch.Tensor:
    """Uncached full-sequence log-probabilities of the next token after ``ids``."""
    with adapters_disabled(model) if adapters_off else contextlib.nullcontext():
        return model(input_ids=torch.tensor([ids])).logits[0, -1, :V].float().log_softmax(-1)


@torch.inference_mode()
def value(vm: nn.Module, ids: list[int]) -> float:
    return vm(input_ids=torch.tensor([ids])).values[0, -1].item()


def ids_of(tok: PreTrainedTokenizerBase, prompts: list[str], chat: bool = False) -> list[list[int]]:
    return [encode_prompt(tok, p, chat=chat) for p in prompts]


def stops_of(model: nn.Module, tok) -> set[int]:
    return stop_token_ids(model, tok)


def steps_until_stop(row: list[int], stops: set[int]) -> int:
    """How many steps of a row were real: up to and including its stop token."""
    return next((j + 1 for j, t in enumerate(row) if t in stops), len(row))


def hand_scores(terms: list[ModelTerm], base_ids: list[int], expert_ids: list[int],
                new: list[int]) -> torch.Tensor:
    """sum_j w_j log_softmax(z_j) from each model's own uncached forward over prompt + new tokens."""
    return sum(t.weight * logp(t.model, (expert_ids if t.expert_prompt else base_ids) + new, t.adapters_off)
               for t in terms)


# --- (1) + (4): the cached lockstep decoder equals the formula on uncached full sequences -----------------
@pytest.mark.parametrize("eft", [False, True], ids=["proxy", "eft-two-experts"])
def test_combined_scores_equal_the_formula_from_uncached_logits_at_every_step(trio, tok, eft):
    base, expert, anti = trio
    if eft:
        terms = proxy_terms(base, experts=[(expert, anti, 0.3), (tiny_llama(seed=3), tiny_llama(seed=4), 0.7)])
    else:
        terms = proxy_terms(base, expert=expert, anti_expert=anti, beta=0.7)
    base_ids, expert_ids = ids_of(tok, PROMPTS[:3]), ids_of(tok, PROMPTS[:3], chat=True)  # expert: chat turn
    stops = stops_of(base, tok)
    out = steer_ids(terms, base_ids, expert_prompt_ids=expert_ids, max_new_tokens=8, stops=stops, trace=True)
    assert [t.weight for t in terms] == ([1.0, 0.3, -0.3, 0.7, -0.7] if eft else [1.0, 0.7, -0.7])
    for b in range(3):
        row = out.tokens[b].tolist()
        for t in range(steps_until_stop(row, stops)):
            expected = hand_scores(terms, base_ids[b], expert_ids[b], row[:t])
            torch.testing.assert_close(out.scores[t][b], expected, atol=ATOL, rtol=0)
            assert row[t] == expected.argmax().item()  # uncached greedy picks the same token


def test_scorer_agrees_with_the_decoders_per_step_scores(trio, tok):
    base, expert, anti = trio
    terms = proxy_terms(base, expert=expert, anti_expert=anti, beta=1.5)
    context, expert_context = ids_of(tok, ["Once upon"])[0], ids_of(tok, ["Once upon"], chat=True)[0]
    out = steer_ids(terms, [context], expert_prompt_ids=[expert_context], max_new_tokens=6, trace=True)
    generated = out.tokens[0].tolist()
    decoder = torch.stack([s[0].double().log_softmax(-1)[g] for s, g in zip(out.scores, generated)])
    scored = proxy_score_continuations(terms, context, [generated, generated[:2], generated[:1]],
                                       expert_context=expert_context)
    torch.testing.assert_close(scored[0], decoder, atol=ATOL, rtol=0)
    torch.testing.assert_close(scored[1], decoder[:2], atol=ATOL, rtol=0)
    labels = [" a time", " there"]
    text = proxy_logprobs(base, tok, ["Once upon"], labels, expert=expert, anti_expert=anti, beta=1.5,
                          expert_chat=True)
    label_ids = [tok(label, add_special_tokens=False).input_ids for label in labels]
    by_ids = proxy_score_continuations(terms, context, label_ids, expert_context=expert_context)
    assert text == [[pytest.approx(s.sum().item(), abs=1e-9) for s in by_ids]]
    head, last = label_ids[0][:-1], label_ids[0][-1]
    step = steer_ids(terms, [context + head], expert_prompt_ids=[expert_context + head], max_new_tokens=1,
                     trace=True).scores[0][0].double().log_softmax(-1)
    assert by_ids[0][-1].item() == pytest.approx(step[last].item(), abs=ATOL)


def test_one_pass_of_term_logprobs_gives_every_models_own_scores_and_any_beta(trio, tok):
    """The per-term log-probabilities, weighted, reproduce each model's own continuation scores
    (lmadapt.evaluation.score_continuations) and the proxy scores at every beta without another forward."""
    from lmadapt.decoding.scoring import score_continuations
    from lmadapt.decoding.steered_scoring import (
        combine_continuation_logprobs,
        continuation_logprobs,
    )

    base, expert, anti = trio
    terms = proxy_terms(base, expert=expert, anti_expert=anti, beta=1.0)
    context = ids_of(tok, ["Once upon"])[0]
    conts = [tok(c, add_special_tokens=False).input_ids for c in [" a time", " there", "x"]]
    per_term = continuation_logprobs(terms, context, conts)
    for j, model in enumerate([base, expert, anti]):
        alone = combine_continuation_logprobs(per_term, [float(i == j) for i in range(3)], conts)
        for got, want in zip(alone, score_continuations(model, context, conts)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for beta in (0.5, 2.0):
        want = proxy_score_continuations(proxy_terms(base, expert=expert, anti_expert=anti, beta=beta), context, conts)
        got = combine_continuation_logprobs(per_term, [1.0, beta, -beta], conts)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-9, rtol=0)


# --- (2), (3): beta = 0 and expert == anti-expert give the large model's own output ------------------------
def test_beta_zero_gives_the_large_models_greedy_output_token_for_token(trio, tok):
    base, expert, anti = trio
    stops = stops_of(base, tok)
    terms = proxy_terms(base, expert=expert, anti_expert=anti, beta=0.0)
    for prompt in PROMPTS:
        ids = ids_of(tok, [prompt])[0]
        with torch.no_grad():
            hf = base.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, use_cache=True,
                               pad_token_id=tok.pad_token_id, eos_token_id=sorted(stops))[0, len(ids):].tolist()
        ours = steer_ids(terms, [ids], max_new_tokens=12, stops=stops, pad_id=tok.pad_token_id).tokens[0].tolist()
        assert ours[:steps_until_stop(ours, stops)] == hf[:steps_until_stop(hf, stops)]
    assert steered_generate(base, tok, PROMPTS, expert=expert, anti_expert=anti, beta=0.0,
                            max_new_tokens=12) == generate(base, tok, PROMPTS, max_new_tokens=12)


def test_expert_equal_to_anti_expert_gives_the_base_output(trio, tok):
    base, expert, _ = trio
    steered = steered_generate(base, tok, PROMPTS, expert=expert, anti_expert=expert, beta=2.0, max_new_tokens=12)
    assert steered == generate(base, tok, PROMPTS, max_new_tokens=12)
    differs = steered_generate(base, tok, PROMPTS, expert=expert, anti_expert=trio[2], max_new_tokens=12)
    assert differs != steered  # the test can tell steering from no steering


# --- (5): adapter expert, anti-expert = the same module with its adapters off --------------------------------
def test_adapter_expert_with_adapters_off_equals_two_separate_copies(trio, tok):
    base = trio[0]
    shared = lora_expert()
    with_adapter, plain = copy.deepcopy(shared), tiny_llama(seed=1)
    shared.train()  # the decoder runs in eval mode and gives the mode back
    same_module = proxy_terms(base, expert=shared, beta=0.8)
    assert same_module[2].model is shared and same_module[2].adapters_off
    separate = proxy_terms(base, expert=with_adapter, anti_expert=plain, beta=0.8)
    prompt_ids = ids_of(tok, PROMPTS)
    a = steer_ids(same_module, prompt_ids, max_new_tokens=8, trace=True)
    b = steer_ids(separate, prompt_ids, max_new_tokens=8, trace=True)
    assert torch.equal(a.tokens, b.tokens)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    assert shared.training and all(m.adapter_enabled for m in shared.modules() if hasattr(m, "adapter_enabled"))
    torch.testing.assert_close(logp(shared, prompt_ids[0], adapters_off=True), logp(plain, prompt_ids[0]),
                               atol=ATOL, rtol=0)
    assert not torch.allclose(logp(shared, prompt_ids[0]), logp(plain, prompt_ids[0]), atol=1e-3)


def test_an_expert_without_adapter_and_without_anti_expert_is_refused(trio):
    with pytest.raises(LmadaptError, match="no anti-expert"):
        proxy_terms(trio[0], expert=trio[1])
    with pytest.raises(LmadaptError, match="without an expert"):
        proxy_terms(trio[0], anti_expert=trio[1])


# --- (6): vocabularies --------------------------------------------------------------------------------------
def swapped_tokenizer(a: int, b: int) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with the tokens of ids ``a`` and ``b`` exchanged."""
    spec = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    ta, tb = next(t for t, i in vocab.items() if i == a), next(t for t, i in vocab.items() if i == b)
    vocab[ta], vocab[tb] = b, a
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>", unk_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS)


def test_mismatched_vocabularies_are_refused_naming_the_differing_tokens(trio, tok):
    base, expert, anti = trio
    with pytest.raises(LmadaptError, match=r"in 2 token id\(s\), e\.g\. id 17: '2' vs '3', id 18: '3' vs '2'"):
        steered_generate(base, tok, ["Hi"], expert=expert, anti_expert=anti, expert_tokenizer=swapped_tokenizer(17, 18))
    bigger = tiny_tokenizer()
    bigger.add_tokens(["abc"])
    with pytest.raises(LmadaptError, match=r"id 260: \(none\) vs 'abc'.*no cross-vocabulary mapping"):
        check_vocabularies(tok, {"expert": bigger})
    check_vocabularies(tok, {"expert": tiny_tokenizer()})  # identical: fine
    with pytest.raises(LmadaptError, match="only 200 output rows but the tokenizer has 260 tokens"):
        steered_generate(base, tok, ["Hi"], expert=tiny_llama(vocab_size=200), anti_expert=anti)


def test_a_padding_tail_is_truncated_to_the_common_prefix(trio, tok):
    base, _, anti = trio
    padded = tiny_llama(seed=1, vocab_size=272)  # 12 padding rows past the tokenizer's 260 tokens
    terms = proxy_terms(base, expert=padded, anti_expert=anti)
    ids = ids_of(tok, ["Hello"])
    out = steer_ids(terms, ids, max_new_tokens=4, trace=True, vocab_size=None)
    assert out.scores[0].shape == (1, V)
    new = out.tokens[0].tolist()
    for t in range(4):
        torch.testing.assert_close(out.scores[t][0], hand_scores(terms, ids[0], ids[0], new[:t]), atol=ATOL, rtol=0)
    steered_generate(base, tok, ["Hello"], expert=padded, anti_expert=anti, max_new_tokens=3)


# --- (7): VAS -----------------------------------------------------------------------------------------------
def test_vas_with_beta_zero_is_plain_top_k_sampling_of_the_base(trio, tok):
    base = trio[0]
    kw = dict(max_new_tokens=10, temperature=1.0, seed=3)
    vas = steered_generate(base, tok, PROMPTS, values=[(StandInValue(), 0.0)], vas_top_k=10, **kw)
    assert vas == steered_generate(base, tok, PROMPTS, top_k=10, **kw)
    assert steered_generate(base, tok, PROMPTS, values=[(StandInValue(), 0.0)], max_new_tokens=10) == \
        generate(base, tok, PROMPTS, max_new_tokens=10)


def test_a_planted_value_raises_its_tokens_probability_monotonically_in_beta(trio, tok):
    base = trio[0]
    ids = ids_of(tok, ["Hello"])
    favoured = logp(base, ids[0]).topk(10).indices[6].item()  # in K, but far from the base's favourite
    vm = StandInValue(head_std=0.0, planted={favoured: 1.0})
    probs = []
    for beta in [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]:
        out = steer_ids([ModelTerm(base)], ids, values=[ValueTerm(vm, beta)], max_new_tokens=1, trace=True)
        probs.append(out.scores[0][0].softmax(-1)[favoured].item())
    assert all(a < b for a, b in zip(probs, probs[1:])), probs
    assert out.tokens[0, 0].item() == favoured  # greedy at beta = 8


def test_centring_makes_vas_invariant_to_a_constant_shift_of_the_value(trio, tok):
    base, ids = trio[0], ids_of(tok, PROMPTS[:2])
    runs = [steer_ids([ModelTerm(base)], ids, values=[ValueTerm(StandInValue(shift=shift), 1.5)], max_new_tokens=6,
                      trace=True) for shift in (0.0, 3.0)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    for x, y in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    assert not torch.allclose(runs[0].values[0], runs[1].values[0])  # the raw values did move


def real_value_model(seed: int) -> ValueModel:
    """lmadapt.vas's ValueModel on a tiny Llama, with a random (not zero) head."""
    vm = ValueModel(tiny_llama(seed=seed), tiny_tokenizer())
    with torch.no_grad():
        vm.value_head.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return vm


@pytest.mark.parametrize("kind", ["stand-in", "lmadapt.vas.ValueModel"])
def test_values_from_the_expanded_prefix_cache_equal_full_sequence_values_and_combine_with_weights(trio, tok, kind):
    base, expert, anti = trio
    make = StandInValue if kind == "stand-in" else real_value_model
    v1, v2 = make(seed=5), make(seed=6)
    terms = proxy_terms(base, expert=expert, anti_expert=anti, beta=0.5)  # VAS on proxy-tuned scores
    ids = ids_of(tok, PROMPTS[:3])
    out = steer_ids(terms, ids, values=[ValueTerm(v1, 0.5), ValueTerm(v2, -1.5)], vas_top_k=4, max_new_tokens=5,
                    trace=True)
    for b in range(3):
        new = out.tokens[b].tolist()
        for t in range(5):
            prefix, cands = ids[b] + new[:t], out.candidates[t][b].tolist()
            assert new[t] in cands
            full = torch.tensor([[value(vm, prefix + [a]) for a in cands] for vm in (v1, v2)])
            torch.testing.assert_close(out.values[t][:, b], full, atol=ATOL, rtol=0)
            proxied = hand_scores(terms, ids[b], ids[b], new[:t])
            assert cands == proxied.topk(4).indices.tolist()
            centred = full - full.mean(-1, keepdim=True)
            expected = torch.full((V,), float("-inf"))
            expected[cands] = proxied[cands] + 0.5 * centred[0] - 1.5 * centred[1]
            torch.testing.assert_close(out.scores[t][b], expected, atol=ATOL, rtol=0)


# --- (8): batching ------------------------------------------------------------------------------------------
def test_batches_of_different_prompt_lengths_give_the_one_at_a_time_outputs(trio, tok):
    base, expert, anti = trio
    kw = dict(expert=expert, anti_expert=anti, expert_chat=True, values=[(StandInValue(), 1.0)], vas_top_k=5,
              max_new_tokens=10)
    one = steered_generate(base, tok, PROMPTS, batch_size=1, **kw)
    assert steered_generate(base, tok, PROMPTS, batch_size=4, **kw) == one
    pieces: dict[int, str] = {}
    streamed = steered_generate(base, tok, PROMPTS[:3], batch_size=3, stream=lambda i, p: pieces.__setitem__(
        i, pieces.get(i, "") + p), **kw)
    assert [pieces.get(i, "") for i in range(3)] == streamed == one[:3]


# --- (9): sampling -------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(trio, tok):
    base, expert, anti = trio
    kw = dict(expert=expert, anti_expert=anti, max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9)
    state = torch.get_rng_state()
    a = steered_generate(base, tok, PROMPTS, seed=4, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == steered_generate(base, tok, PROMPTS, seed=4, **kw)
    assert a != steered_generate(base, tok, PROMPTS, seed=5, **kw)


def test_sampled_tokens_respect_top_k_and_top_p(trio, tok):
    base, expert, anti = trio
    terms = proxy_terms(base, expert=expert, anti_expert=anti)
    ids = ids_of(tok, PROMPTS)
    with seeded(0, torch.device("cpu")):
        k = steer_ids(terms, ids, max_new_tokens=12, temperature=1.5, top_k=3, trace=True)
        p = steer_ids(terms, ids, max_new_tokens=12, temperature=0.7, top_p=0.5, trace=True)
    for t, scores in enumerate(k.scores):
        assert all(k.tokens[b, t].item() in scores[b].topk(3).indices.tolist() for b in range(len(ids)))
    for t, scores in enumerate(p.scores):
        probs, order = (scores / 0.7).softmax(-1).sort(-1, descending=True)
        for b in range(len(ids)):
            nucleus = order[b, :int(((probs[b].cumsum(0) - probs[b]) < 0.5).sum())].tolist()
            assert p.tokens[b, t].item() in nucleus
    draws = torch.stack([sample_next(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log(), 1.0, 0, 0.75)
                         for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}
