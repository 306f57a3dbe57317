"""Proxy-tuned models served by the engine and ``lmadapt serve --proxy``, against lmadapt's own proxy-tuning.

A tiny "large" Llama (the base, seed 0: the one ``tiny_lora_adapters`` fit) and a tiny "small" Llama (half its
width) share the byte-level tiny tokenizer; the expert is the small model with a random LoRA adapter, or a second
small model. The reference for a proxy row is :func:`lmadapt.decoding.steering.steer_ids` (what ``lmadapt
generate --proxy-...`` decodes with), one prompt at a time, without padding; for the HTTP API it is
:func:`lmadapt.api.steer` on the same folders. Log-probabilities are checked against the formula
``log_softmax(l_large + beta (l_expert - l_anti))`` computed by hand from uncached full-sequence forwards. fp32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import torch
from test_serving_http import running
from test_steering import swapped_tokenizer
from transformers import GenerationConfig

from lmadapt.adapters.format import load_adapter, save_adapter
from lmadapt.api import steer
from lmadapt.cli import main
from lmadapt.decoding.steering import proxy_terms, steer_ids
from lmadapt.errors import LmadaptError
from lmadapt.methods import build_method
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.tree import adapters_disabled
from lmadapt.serving.app import create_app
from lmadapt.serving.engine import (
    Engine,
    GenerationRequest,
    ProxyModel,
    ProxySpec,
    SamplingParams,
)
from lmadapt.serving.server import load_engine
from lmadapt.testing import tiny_llama, tiny_lora_adapters, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

WAIT = 60.0
TOK = tiny_tokenizer()
PROMPTS = {"one": "x", "short": "hi there", "mid": "The quick brown fox jumps", "long": "A long prompt: " + "abcdefghij" * 7}
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}


def ids(name: str) -> list[int]:
    return list(TOK(PROMPTS[name]).input_ids)


def small_llama(seed: int, **overrides: int) -> torch.nn.Module:
    return tiny_llama(seed=seed, **SMALL, **overrides)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The small model (and a second, "tuned" one) as model folders, the expert LoRA adapter of the first, and a
    LoRA adapter of the large model (served as plain adapter "a")."""
    root = tmp_path_factory.mktemp("proxy")
    out = {"a": tiny_lora_adapters(root=root / "large-loras")[0]}
    for name, seed, context in (("small", 1, 512), ("tuned", 2, 512), ("short", 3, 32)):
        small_llama(seed, max_position_embeddings=context).save_pretrained(root / name)
        TOK.save_pretrained(root / name)
        out[name] = str(root / name)
    model = small_llama(1)
    torch.manual_seed(11)
    method = build_method({"name": "lora", "r": 4, "alpha": 16, "init": "random"})
    method.apply(model)
    out["expert"] = str(save_adapter(model, method, root / "expert", base_model=out["small"],
                                     base_fingerprint=fingerprint(small_llama(1))))
    return out


def expert_model(folders: dict[str, str]) -> torch.nn.Module:
    model = small_llama(1)
    load_adapter(model, folders["expert"])
    return model.eval()


def greedy(n: int, **extra: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **extra)


def proxy_reference(expert: torch.nn.Module, anti: torch.nn.Module | None, beta: float, prompt: list[int],
                    n: int) -> list[int]:
    """``n`` greedy tokens of lmadapt's steering decoder for the plain large model and this expert pair."""
    terms = proxy_terms(tiny_llama(), expert=expert, anti_expert=anti, beta=beta)
    return steer_ids(terms, [prompt], max_new_tokens=n, pad_id=TOK.pad_token_id).tokens[0].tolist()


def generate_reference(adapter: str | None, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of transformers' ``generate`` on the large model with only ``adapter`` (None: none)."""
    model = tiny_llama()
    if adapter is not None:
        load_adapter(model, adapter)
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None
    return model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()


def proxy_engine(folders: dict[str, str], **kwargs: Any) -> Engine:
    """The large model with LoRA "a", proxy "p" (small + expert adapter, beta 1.5) and proxy "q" (two small models,
    beta 0.7)."""
    engine = Engine(tiny_llama(), TOK, **kwargs)
    engine.load_adapter("a", folders["a"])
    engine.add_proxy(ProxyModel("p", expert_model(folders), None, 1.5))
    engine.add_proxy(ProxyModel("q", small_llama(2), small_llama(1), 0.7))
    return engine


def test_greedy_proxy_rows_mixed_with_adapter_and_base_rows_equal_lmadapts_proxy_tuning(folders):
    """Proxy rows of both forms, LoRA rows and base rows in one batch of 4 (requests wait, then join as rows
    leave), prompts of 1 to 85 tokens, different lengths: every row equals its own reference token for token."""
    plan = [("p", "long", 10), ("a", "short", 7), ("q", "one", 9), (None, "mid", 6), ("p", "one", 5),
            ("q", "long", 8), ("p", "mid", 12), ("a", "long", 6), (None, "one", 9)]
    engine = proxy_engine(folders, max_batch_size=4)
    handles = [engine.submit(GenerationRequest(ids(prompt), model, greedy(n))) for model, prompt, n in plan]
    engine.start()
    try:
        results = [h.result(WAIT) for h in handles]
    finally:
        engine.shutdown()
    pairs = {"p": (expert_model(folders), None, 1.5), "q": (small_llama(2), small_llama(1), 0.7)}
    for (model, prompt, n), result in zip(plan, results):
        if model in pairs:
            expected = proxy_reference(*pairs[model], ids(prompt), n)
        else:
            expected = generate_reference(folders.get(model), ids(prompt), n)
        assert result.token_ids == expected, (model, prompt)
        assert (result.finish_reason, result.completion_tokens) == ("length", n)
    # not vacuous: each proxy changes the base model's greedy output, and beta matters
    base = generate_reference(None, ids("long"), 10)
    assert proxy_reference(*pairs["p"], ids("long"), 10) != base != proxy_reference(*pairs["q"], ids("long"), 10)
    assert proxy_reference(pairs["p"][0], None, 0.3, ids("long"), 10) != proxy_reference(*pairs["p"], ids("long"), 10)
    assert engine.stats()["forwards"] > engine.stats()["steps"] * 3  # the proxy groups' three forwards a step


@torch.inference_mode()
def hand_logprobs(expert: torch.nn.Module, anti: torch.nn.Module | None, beta: float,
                  sequence: list[int]) -> torch.Tensor:
    """``log_softmax(l_large + beta (l_expert - l_anti))`` of the token after ``sequence``, from full forwards."""
    def logp(model: torch.nn.Module, off: bool = False) -> torch.Tensor:
        with adapters_disabled(model) if off else contextlib.nullcontext():
            return model(input_ids=torch.tensor([sequence])).logits[0, -1].float().log_softmax(-1)

    anti_logp = logp(expert, off=True) if anti is None else logp(anti)
    return (logp(tiny_llama()) + beta * (logp(expert) - anti_logp)).log_softmax(-1)


def test_logprobs_of_a_proxy_row_are_the_proxy_tuned_distributions(folders):
    engine = proxy_engine(folders)
    engine.start()
    try:
        results = {m: engine.submit(GenerationRequest(ids("mid"), m, greedy(6, logprobs=3))).result(WAIT) for m in "pq"}
    finally:
        engine.shutdown()
    pairs = {"p": (expert_model(folders), None, 1.5), "q": (small_llama(2), small_llama(1), 0.7)}
    for model, result in results.items():
        sequence = ids("mid")
        for token, logprob, top in zip(result.token_ids, result.logprobs, result.top_logprobs):
            expected = hand_logprobs(*pairs[model], sequence)
            assert token == int(expected.argmax())
            assert logprob == pytest.approx(float(expected[token]), abs=1e-4)
            best = expected.topk(3)
            assert [t for t, _ in top] == [TOK.decode([int(i)]) for i in best.indices]
            assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)
            sequence = sequence + [token]


def test_a_proxy_whose_tokenizer_differs_from_the_base_is_refused(folders):
    engine = Engine(tiny_llama(), TOK)
    swapped = ProxyModel("p", expert_model(folders), None, 1.0, {"expert adapter": swapped_tokenizer(17, 18)})
    with pytest.raises(LmadaptError, match=r"expert adapter tokenizer differs from the base model's in 2 token id"):
        engine.add_proxy(swapped)
    assert engine.proxies() == {}
    engine.add_proxy(ProxyModel("p", expert_model(folders), None, 1.0, {"expert adapter": tiny_tokenizer()}))
    assert list(engine.proxies()) == ["p"]
    with pytest.raises(LmadaptError, match="'p' is taken by a proxy-tuned model"):
        engine.add_proxy(ProxyModel("p", small_llama(2), small_llama(1), 1.0))
    with pytest.raises(LmadaptError, match="taken by a proxy-tuned model"):
        engine.load_adapter("p", folders["a"])
    with pytest.raises(LmadaptError, match="no anti-expert"):  # a plain small model cannot switch an adapter off
        engine.add_proxy(ProxyModel("r", small_llama(2), None, 1.0))


def test_serve_refuses_a_small_model_with_another_vocabulary_at_start_up(folders, tiny_model_dir, tmp_path, capsys):
    odd = tmp_path / "odd-small"
    small_llama(1).save_pretrained(odd)
    swapped_tokenizer(17, 18).save_pretrained(odd)
    code = main(["serve", "--model", str(tiny_model_dir), "--port", "0", "--threads", "1",
                 "--proxy", f"p={folders['expert']},{odd}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (f"lmadapt serve: error: cannot serve the proxy-tuned model 'p': the small model {odd} tokenizer differs "
            f"from the base model's in 2 token id(s), e.g. id 17: '2' vs '3'") in err


@pytest.mark.parametrize(("spec", "words"), [
    ("p", "expected NAME=EXPERT,ANTI[,BETA]"),
    ("p=only-one", "expected NAME=EXPERT,ANTI[,BETA]"),
    ("p=a,b,1,2", "expected NAME=EXPERT,ANTI[,BETA]"),
    ("=a,b", "expected NAME=EXPERT,ANTI[,BETA]"),
    ("p=a,,1", "expected NAME=EXPERT,ANTI[,BETA]"),
    ("p=a,b,strong", "BETA must be a finite number"),
    ("p=a,b,inf", "BETA must be a finite number"),
])
def test_a_malformed_proxy_spec_exits_2_saying_what_is_expected(spec, words, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--proxy", spec])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --proxy" in err and words in err


@pytest.mark.parametrize(("spec", "words"), [
    ("p={missing},{small}", "EXPERT '{missing}' is neither an adapter folder"),
    ("p={expert},{expert}", "ANTI '{expert}' is an adapter folder; ANTI is a model"),
    ("p={tuned},{missing}", "ANTI '{missing}' is neither a model folder"),
    ("bad name={expert},{small}", "adapter name 'bad name' must be"),
    ("tiny={expert},{small}", "'tiny' is the base model's name"),
    ("a={expert},{small}", "the name(s) a are given twice"),
])
def test_a_proxy_spec_that_names_no_usable_model_exits_2_before_loading(spec, words, folders, tiny_model_dir,
                                                                         tmp_path, capsys, monkeypatch):
    paths = {**folders, "missing": str(tmp_path / "missing")}
    monkeypatch.setattr("lmadapt.serving.server.load_model", lambda *_: pytest.fail("a model was loaded"))
    code = main(["serve", "--model", str(tiny_model_dir), "--served-model-name", "tiny", "--port", "0",
                 "--adapter", f"a={folders['a']}", "--proxy", spec.format(**paths)])
    err = capsys.readouterr().err
    assert code == 2 and words.format(**paths) in err and "Traceback" not in err
    assert ProxySpec.parse("p=x,y,-0.5") == ProxySpec("p", "x", "y", -0.5)


def test_the_http_api_serves_proxy_tuned_models_as_lmadapt_steer_generates_them(folders, tiny_model_dir):
    """``/v1/chat/completions`` (whole and streamed) and ``/v1/completions`` with the ``openai`` client equal
    :func:`lmadapt.api.steer` on the same folders; ``/v1/models`` lists the proxies with their parent and pair."""
    loaded = load_engine(str(tiny_model_dir), {"a": folders["a"]}, served_model_name="tiny", max_batch_size=4,
                         proxies=[f"p={folders['expert']},{folders['small']},1.5",
                                  ProxySpec("q", folders["tuned"], folders["small"], 0.7),
                                  ProxySpec("r", folders["short"], folders["small"])])
    app = create_app(loaded.engine, loaded.tokenizer, loaded.base)
    references = {
        "p": {"small_model": folders["small"], "expert_adapter": folders["expert"], "beta": 1.5},
        "q": {"expert": folders["tuned"], "anti_expert": folders["small"], "beta": 0.7}}
    with running(app) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        for name, pair in references.items():
            chat = steer(str(tiny_model_dir), ["hello"], chat=True, max_new_tokens=12, **pair)[0]
            plain = steer(str(tiny_model_dir), ["Once upon"], chat=False, max_new_tokens=10, **pair)[0]
            messages = [{"role": "user", "content": "hello"}]
            answer = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
            assert answer.choices[0].message.content == chat and answer.model == name
            streamed = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0,
                                                      stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat
            completion = client.completions.create(model=name, prompt="Once upon", max_tokens=10, temperature=0)
            assert completion.choices[0].text == plain
        base = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, temperature=0)
        assert base.choices[0].text != completion.choices[0].text  # the proxy steers the base
        with pytest.raises(openai.BadRequestError, match="context holds 32 tokens") as refused:
            client.completions.create(model="r", prompt="Once upon", max_tokens=30, temperature=0)
        assert refused.value.code == "context_length_exceeded"  # the short small model's context, not the base's
        bodies = {"load": {"lora_name": "p", "lora_path": folders["a"]}, "unload": {"lora_name": "p"}}
        for route, body in bodies.items():  # a proxy is no adapter: its name cannot be loaded over or unloaded
            response = httpx2.post(f"{url}/v1/{route}_lora_adapter", json=body)
            assert response.status_code == 400 and "proxy-tuned model" in response.json()["error"]["message"]
        cards = {m.id: m.model_dump() for m in client.models.list()}
    assert list(cards) == ["tiny", "a", "p", "q", "r"]
    assert cards["r"]["max_model_len"] == 32
    assert cards["p"]["parent"] == cards["q"]["parent"] == "tiny" and cards["a"]["parent"] == "tiny"
    assert cards["p"]["proxy"] == {"expert": f"{folders['small']} + adapter {folders['expert']}",
                                   "anti_expert": folders["small"], "beta": 1.5, "expert_adapter": folders["expert"],
                                   "small_model": folders["small"]}
    assert cards["q"]["proxy"] == {"expert": folders["tuned"], "anti_expert": folders["small"], "beta": 0.7}
    assert cards["p"]["root"] == folders["expert"] and cards["p"]["max_model_len"] == 512
    assert Path(cards["q"]["root"]) == Path(folders["tuned"])
