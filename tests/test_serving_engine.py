"""The serving engine (continuous batching, per-row adapters, per-row sampling) against references.

The reference for a row is its adapter alone: a fresh tiny Llama with only that adapter (or none) loaded,
decoded greedily by transformers' ``model.generate``, one prompt at a time, without padding. Log-probabilities
are compared with ``log_softmax`` of one full forward over prompt + output. fp32 throughout.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from test_methods import CONFIGS  # the contract table: one small config per method
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

from lmadapt.adapters.format import load_adapter, save_adapter
from lmadapt.adapters.pool import adapter_names
from lmadapt.errors import AdapterError
from lmadapt.methods import build_method
from lmadapt.models.fingerprint import fingerprint
from lmadapt.serving.engine import (
    Engine,
    EngineStoppedError,
    GenerationRequest,
    QueueFullError,
    RequestError,
    SamplingParams,
    UnknownAdapterError,
)
from lmadapt.serving.sampling import RowSampler, TextStream, processed_scores
from lmadapt.testing import (
    tiny_bpe_tokenizer,
    tiny_llama,
    tiny_lora_adapters,
    tiny_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WAIT = 60.0  # seconds a test waits for one event before failing
TOK = tiny_tokenizer()
PROMPTS = {  # very different lengths, so rows of one batch carry very different padding
    "one": "x", "short": "hi there", "mid": "The quick brown fox jumps", "long": "A long prompt: " + "abcdefghij" * 7,
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ids(name: str) -> list[int]:
    return list(TOK(PROMPTS[name]).input_ids)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three LoRA adapters of the tiny Llama (random B, so they change its outputs), different ranks and modules."""
    specs = ({"r": 4, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"]},
             {"r": 2, "alpha": 8, "rslora": True, "target_modules": ALL},
             {"r": 4, "alpha": 16, "target_modules": ["o_proj", "down_proj"]})
    paths = tiny_lora_adapters(*specs, root=tmp_path_factory.mktemp("loras"))
    return dict(zip("abc", paths))


_ALONE: dict[str | None, torch.nn.Module] = {}


def alone(folder: str | None) -> torch.nn.Module:
    """A tiny Llama with only the adapter in ``folder`` (None: the base model), cached per folder."""
    if folder not in _ALONE:
        model = tiny_llama()
        if folder is not None:
            load_adapter(model, folder)
        _ALONE[folder] = model.eval()
    return _ALONE[folder]


def reference(folder: str | None, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from ``model.generate`` with the adapter alone, never stopping early."""
    model = alone(folder)
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         generation_config=config)
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == n
    return tokens


def greedy(n: int, **extra: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **extra)


def engine_with(folders: dict[str, str], names: str = "ab", model: torch.nn.Module | None = None,
                **kwargs: object) -> Engine:
    engine = Engine(model if model is not None else tiny_llama(), TOK, **kwargs)
    for name in names:
        engine.load_adapter(name, folders[name])
    return engine


def test_greedy_rows_of_mixed_adapters_lengths_and_joins_equal_each_adapter_alone(folders: dict[str, str]) -> None:
    """Base rows and two LoRA adapters in one batch, prompts of 1 to 85 tokens, different max_tokens (rows leave at
    different steps), a batch of 3 (requests wait and join as rows leave) and two requests joining mid-way."""
    late = {3: ("b", "long", 9), 6: (None, "one", 7)}  # step -> (adapter, prompt, max_tokens)
    handles: dict[tuple[str | None, str, int], object] = {}

    def before_step(step: int) -> None:
        if step in late:
            adapter, prompt, n = late[step]
            handles[late[step]] = engine.submit(GenerationRequest(ids(prompt), adapter, greedy(n)))

    engine = engine_with(folders, max_batch_size=3, before_step=before_step)
    first = [("a", "long", 12), (None, "short", 5), ("b", "mid", 10), ("a", "one", 8), (None, "long", 6)]
    for key in first:
        handles[key] = engine.submit(GenerationRequest(ids(key[1]), key[0], greedy(key[2])))
    engine.start()
    try:
        results = {key: handles[key].result(WAIT) for key in first}  # by then the worker submitted the late ones
        assert len(handles) == len(first) + len(late)
        results.update({key: handles[key].result(WAIT) for key in late.values()})
    finally:
        engine.shutdown()
    for (adapter, prompt, n), result in results.items():
        expected = reference(None if adapter is None else folders[adapter], ids(prompt), n)
        assert result.token_ids == expected, (adapter, prompt)
        assert (result.finish_reason, result.completion_tokens, result.prompt_tokens) == ("length", n, len(ids(prompt)))
        assert result.text == TOK.decode(expected, skip_special_tokens=True)
    # not vacuous: each adapter changes the greedy output of the same prompt
    outputs = {name: reference(folders.get(name), ids("long"), 12) for name in (None, "a", "b")}
    assert len({tuple(v) for v in outputs.values()}) == 3
    assert engine.stats()["prefill_forwards"] >= 3  # the joiners were prefilled apart from the first batch


def test_sliding_window_layers_mix_short_and_long_prompts() -> None:
    """A tiny Gemma 3 with sliding-window (window 4) and full-attention layers: prompts longer and shorter than the
    window share a batch, join and leave, and each row equals the model's own greedy generate."""
    cfg = Gemma3TextConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256,
                           pad_token_id=259, bos_token_id=257, eos_token_id=258, use_cache=False)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    plan = {0: [("long", 9), ("one", 4)], 2: [("mid", 8)], 5: [("short", 6), ("one", 3)]}
    handles = []

    def before_step(step: int) -> None:
        for prompt, n in plan.get(step, []):
            handles.append((prompt, n, engine.submit(GenerationRequest(ids(prompt), None, greedy(n)))))

    engine = Engine(model, TOK, max_batch_size=3, before_step=before_step)
    before_step(0)  # the first two are there before the worker starts (it calls before_step from step 0 on)
    del plan[0]
    engine.start()
    try:
        results = [handles[0][2].result(WAIT)]  # runs to step 8: every late request was submitted by then
        results += [h.result(WAIT) for _, _, h in handles[1:]]
    finally:
        engine.shutdown()
    assert len(results) == 5
    model.generation_config.eos_token_id = None
    for (prompt, n, _), result in zip(handles, results):
        out = model.generate(input_ids=torch.tensor([ids(prompt)]), generation_config=GenerationConfig(
            max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0))
        assert result.token_ids == out[0, len(ids(prompt)):].tolist(), prompt


def test_a_seeded_request_samples_the_same_tokens_whatever_shares_its_batch(folders: dict[str, str]) -> None:
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    request = GenerationRequest(ids("mid"), "a", sampled)

    def run(companions: list[GenerationRequest], joiner_at: int | None = None) -> list[int]:
        joiner = GenerationRequest(ids("one"), None, SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))
        engine = engine_with(folders, before_step=lambda s: engine.submit(joiner) if s == joiner_at else None)
        handles = [engine.submit(r) for r in [*companions, request]]
        engine.start()
        try:
            return [h.result(WAIT) for h in handles][-1].token_ids
        finally:
            engine.shutdown()

    by_itself = run([])
    crowded = run([GenerationRequest(ids("long"), "b", SamplingParams(max_tokens=9, temperature=1.3, seed=7)),
                   GenerationRequest(ids("short"), None, greedy(30))], joiner_at=4)
    assert crowded == by_itself
    assert by_itself != reference(folders["a"], ids("mid"), 16)  # it did sample
    other_seed = GenerationRequest(ids("mid"), "a", dataclasses.replace(sampled, seed=99))
    engine = engine_with(folders)
    handle = engine.submit(other_seed)
    engine.start()
    assert handle.result(WAIT).token_ids != by_itself
    engine.shutdown()


def test_processed_distribution_is_temperature_then_top_k_then_top_p() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    scores = processed_scores(logits, temperature=0.5, top_k=4, top_p=0.9)
    # by hand: z / 0.5 = [4, 2, 1, 0, -2, 6]; top 4 -> ids 5, 0, 1, 2; their softmax, sorted: 6, 4, 2, 1
    kept = torch.tensor([6.0, 4.0, 2.0, 1.0])
    p = kept.softmax(-1)
    n = int((p.cumsum(0) - p < 0.9).sum())  # the smallest prefix whose mass reaches 0.9
    allowed = [5, 0, 1, 2][:n]
    assert torch.isfinite(scores).nonzero().flatten().tolist() == sorted(allowed)
    expected = torch.full((6,), 0.0)
    expected[allowed] = (logits[allowed] / 0.5).softmax(-1)
    torch.testing.assert_close(scores.softmax(-1), expected)
    assert RowSampler(SamplingParams(temperature=1.0, top_k=1, seed=3), torch.device("cpu")).choose(logits) == 5


def test_text_stream_never_emits_half_a_character_nor_a_stop_string() -> None:
    stream = TextStream(TOK)
    first, second = TOK("é").input_ids  # two byte tokens
    assert (stream.add(first), stream.add(second)) == ("", "é")
    stream = TextStream(TOK, stop=("ab",))
    pieces = [stream.add(t) for t in TOK("xacab!").input_ids]
    assert pieces == ["x", "", "ac", "", "", ""] and stream.stopped and stream.text == "xac"  # nothing after a stop
    stream = TextStream(TOK, stop=("abc",))
    assert [stream.add(t) for t in TOK("zab").input_ids] == ["z", "", ""]
    assert stream.finish() == "ab"  # the output ended: the held-back start of a stop string is text after all
    # SentencePiece-style pieces ("▁" for spaces) and byte fallback: the pieces add up to the whole decode
    texts = ["hello world, the quick brown fox", "ça va bien, merci", "über straße"] * 20
    sentencepiece = tiny_bpe_tokenizer(texts, style="metaspace", vocab_size=330)
    token_ids = sentencepiece("hello  world, ça va? über 🙂 straße", add_special_tokens=False).input_ids
    stream = TextStream(sentencepiece)
    pieces = [stream.add(t) for t in token_ids]
    assert pieces[:4] == ["hello", " ", " wor", "ld,"] and "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + stream.finish() == "hello  world, ça va? über 🙂 straße"


def test_stop_strings_and_stop_tokens_end_the_text_where_they_occur(folders: dict[str, str]) -> None:
    full_ids = reference(folders["b"], ids("short"), 40)
    full = TOK.decode(full_ids, skip_special_tokens=True)
    # a stop string of two printable characters (two byte tokens: held back across a token boundary)
    k = next(i for i in range(3, len(full) - 1) if full[i:i + 2].isprintable() and full[i:i + 2].isascii()
             and full.find(full[i:i + 2]) == i)
    stop_token = next(t for i, t in enumerate(full_ids) if i >= 4 and t not in full_ids[:i])
    cut = full_ids.index(stop_token)
    engine = engine_with(folders, "b")
    assert engine.stop_ids == {TOK.convert_tokens_to_ids("<|im_end|>"), TOK.convert_tokens_to_ids("<|endoftext|>")}
    by_string = engine.submit(GenerationRequest(ids("short"), "b", greedy(40, stop=["\x00never", full[k:k + 2]])))
    by_token = engine.submit(GenerationRequest(ids("short"), "b", greedy(40, stop_token_ids=[stop_token])))
    engine.start()
    try:
        events = list(by_string.events(WAIT))
        token_result = by_token.result(WAIT)
    finally:
        engine.shutdown()
    assert "".join(e.text for e in events) == full[:k]
    assert events[-1].finish_reason == "stop" and all(full[k:k + 2] not in e.text for e in events)
    assert token_result.token_ids == full_ids[:cut]  # the stop token itself is not part of the output
    assert (token_result.finish_reason, token_result.completion_tokens) == ("stop", cut + 1)
    assert token_result.text == TOK.decode(full_ids[:cut], skip_special_tokens=True)


def test_cancel_frees_the_row_and_leaves_the_others(folders: dict[str, str]) -> None:
    engine = engine_with(folders)
    endless = engine.submit(GenerationRequest(ids("mid"), "a", greedy(400)))
    other = engine.submit(GenerationRequest(ids("short"), "b", greedy(12)))
    engine.start()
    try:
        events = endless.events(WAIT)
        next(events), next(events)
        endless.cancel()
        rest = list(events)
        assert rest[-1].finish_reason == "cancelled" and rest[-1].completion_tokens < 400
        assert other.result(WAIT).token_ids == reference(folders["b"], ids("short"), 12)
        waiting = engine.submit(GenerationRequest(ids("one"), None, greedy(5)))
        assert waiting.result(WAIT).finish_reason == "length"
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()


def test_leaving_an_iteration_early_cancels_the_request(folders: dict[str, str]) -> None:
    engine = engine_with(folders, "")
    handle = engine.submit(GenerationRequest(ids("one"), None, greedy(500)))
    engine.start()
    try:
        for _ in handle:
            break
        assert handle.cancelled
        other = engine.submit(GenerationRequest(ids("one"), None, greedy(500)))

        async def first_of_async() -> None:
            async for _ in other.aiter():
                break

        asyncio.run(first_of_async())  # closes the abandoned async generator on the way out
        assert other.cancelled
        assert other.result(WAIT).finish_reason == "cancelled"
    finally:
        engine.shutdown(timeout=WAIT)
    assert engine.stats()["running"] == 0


def test_aiter_gives_the_same_events_as_the_blocking_iterator(folders: dict[str, str]) -> None:
    request = GenerationRequest(ids("mid"), "a", greedy(10, logprobs=2))
    engine = engine_with(folders, max_batch_size=2)
    blocking = engine.submit(request)
    engine.start()
    try:
        expected = list(blocking.events(WAIT))

        async def gather() -> list[object]:
            return [e async for e in engine.submit(request).aiter()]

        assert asyncio.run(gather()) == expected
    finally:
        engine.shutdown()


def test_shutdown_drains_what_was_submitted_then_refuses(folders: dict[str, str]) -> None:
    engine = engine_with(folders, max_batch_size=2)
    handles = [engine.submit(GenerationRequest(ids(p), a, greedy(10))) for p, a in
               [("mid", "a"), ("one", None), ("long", "b"), ("short", "a")]]
    engine.start()
    assert engine.shutdown(drain=True, timeout=WAIT)
    for handle in handles:
        result = handle.result(WAIT)
        assert (result.finish_reason, result.completion_tokens) == ("length", 10)
    with pytest.raises(EngineStoppedError):
        engine.submit(GenerationRequest(ids("one")))
    abrupt = engine_with(folders, "")
    events = abrupt.submit(GenerationRequest(ids("one"), None, greedy(500))).events(WAIT)
    abrupt.start()
    next(events)
    assert not abrupt.shutdown(drain=False, timeout=WAIT)
    rest = list(events)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].completion_tokens < 500


def test_a_full_queue_and_bad_requests_are_refused_with_their_reason(folders: dict[str, str]) -> None:
    engine = engine_with(folders, "a", max_queue=2)
    queued = [engine.submit(GenerationRequest(ids("one"))) for _ in range(2)]
    with pytest.raises(QueueFullError, match="max_queue 2"):
        engine.submit(GenerationRequest(ids("one")))
    with pytest.raises(UnknownAdapterError, match="'zz'.*loaded: \\['a'\\]"):
        engine.submit(GenerationRequest(ids("one"), "zz"))
    with pytest.raises(RequestError, match="temperature.*top_p.*logprobs"):
        engine.submit(GenerationRequest(ids("one"), None, SamplingParams(temperature=-1, top_p=0, logprobs=99)))
    with pytest.raises(RequestError, match="prompt_ids: 999"):
        engine.submit(GenerationRequest([1, 999]))
    with pytest.raises(RequestError, match="non-empty"):
        engine.submit(GenerationRequest([]))
    with pytest.raises(RequestError, match="context holds 512"):
        engine.submit(GenerationRequest([1] * 512))
    assert not engine.shutdown()  # never started: the queued requests are cancelled
    assert [h.result(WAIT).finish_reason for h in queued] == ["cancelled", "cancelled"]


def test_adapters_load_and_unload_while_serving(folders: dict[str, str]) -> None:
    model = tiny_llama()
    engine = engine_with(folders, "a", model=model)
    running = engine.submit(GenerationRequest(ids("long"), "a", greedy(300)))
    engine.start()
    try:
        events = running.events(WAIT)
        tokens = [next(events).token_id]  # decoding has begun
        engine.load_adapter("c", folders["c"])  # queued to the worker, done between two steps
        assert engine.stats()["running"] == 1  # ... while the first request is still decoding
        assert engine.adapters()["c"] == {"path": folders["c"], "method": "lora", "base": "tiny-llama",
                                          "routed": True, "chat_template": None, "system_prompt": None}
        with_c = engine.submit(GenerationRequest(ids("mid"), "c", greedy(20)))
        assert with_c.result(WAIT).token_ids == reference(folders["c"], ids("mid"), 20)
        tokens += [e.token_id for e in events]
        assert tokens == reference(folders["a"], ids("long"), 300)
        engine.unload_adapter("c")
        assert "c" not in engine.adapters() and adapter_names(model) == ["a"]
        with pytest.raises(UnknownAdapterError, match="no adapter named 'c'"):
            engine.submit(GenerationRequest(ids("mid"), "c"))
    finally:
        engine.shutdown()
    idle = engine_with(folders, "a")
    idle.submit(GenerationRequest(ids("mid"), "a"))
    with pytest.raises(AdapterError, match="'a' has 1 request"):  # in flight (here: waiting) requests keep it
        idle.unload_adapter("a")
    idle.shutdown()


def test_a_failing_load_leaves_the_engine_serving_the_others(folders: dict[str, str], tmp_path: Path) -> None:
    other_base = tiny_llama(hidden_size=32)
    method = build_method({"name": "lora", "r": 2, "target_modules": ["q_proj"], "init": "random"})
    method.apply(other_base)
    misfit = save_adapter(other_base, method, tmp_path / "misfit", base_model="other",
                          base_fingerprint=fingerprint(tiny_llama(hidden_size=32)))
    model = tiny_llama()
    engine = engine_with(folders, "a", model=model)
    engine.start()
    try:
        with pytest.raises(AdapterError, match="not an adapter folder"):
            engine.load_adapter("empty", tmp_path)
        with pytest.raises(AdapterError, match="trained on base model 'other'"):
            engine.load_adapter("misfit", misfit)
        with pytest.raises(AdapterError, match="loaded already"):
            engine.load_adapter("a", folders["b"])
        with pytest.raises(AdapterError):  # forced past the fingerprint, its tensors do not fit
            engine.load_adapter("misfit", misfit, force=True)
        assert set(engine.adapters()) == {"a"} and adapter_names(model) == ["a"]
        result = engine.submit(GenerationRequest(ids("mid"), "a", greedy(12))).result(WAIT)
        assert result.token_ids == reference(folders["a"], ids("mid"), 12)
    finally:
        engine.shutdown()


def test_logprobs_are_the_raw_model_log_softmax_of_the_chosen_tokens(folders: dict[str, str]) -> None:
    engine = engine_with(folders)
    prompt = ids("mid")
    handles = [engine.submit(GenerationRequest(prompt, "b", greedy(8, logprobs=3))),
               engine.submit(GenerationRequest(prompt, "b", SamplingParams(max_tokens=8, temperature=0.7, top_k=20,
                                                                           seed=11, logprobs=0, ignore_eos=True)))]
    engine.start()
    try:
        results = [h.result(WAIT) for h in handles]
    finally:
        engine.shutdown()
    for result in results:
        full = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            logp = alone(folders["b"])(input_ids=full).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        chosen = logp.gather(1, torch.tensor(result.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(result.logprobs), chosen, atol=1e-4, rtol=0)
    greedy_result = results[0]
    full = torch.tensor([prompt + greedy_result.token_ids])
    with torch.no_grad():
        logp = alone(folders["b"])(input_ids=full).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    for row, alternatives in zip(logp, greedy_result.top_logprobs):
        best = row.topk(3)
        assert [text for text, _ in alternatives] == [TOK.decode([int(i)]) for i in best.indices]
        torch.testing.assert_close(torch.tensor([v for _, v in alternatives]), best.values, atol=1e-4, rtol=0)
    assert results[1].top_logprobs == [[]] * 8


def test_concurrent_requests_share_forwards(folders: dict[str, str]) -> None:
    """4 requests of 8 tokens: one prefill forward (their first tokens) and 7 decode forwards, not 32."""
    model = tiny_llama()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    engine = engine_with(folders, model=model)
    calls.clear()  # the probe forwards of construction and loading
    handles = [engine.submit(GenerationRequest(ids(p), a, greedy(8))) for p, a in
               [("mid", "a"), ("one", None), ("long", "b"), ("short", "a")]]
    engine.start()
    try:
        assert all(h.result(WAIT).completion_tokens == 8 for h in handles)
    finally:
        engine.shutdown()
    assert len(calls) == 8
    assert engine.stats()["forwards"] == 8 and engine.stats()["prefill_forwards"] == 1


def test_an_exception_in_a_step_fails_its_requests_and_the_engine_goes_on(folders: dict[str, str]) -> None:
    model = tiny_llama()
    broken = {"on": False}

    def forward_hook(module: torch.nn.Module, args: tuple) -> None:
        if broken["on"]:
            raise RuntimeError("simulated device failure")

    model.register_forward_pre_hook(forward_hook)
    engine = engine_with(folders, model=model, before_step=lambda step: broken.update(on=step == 3))
    handles = [engine.submit(GenerationRequest(ids("mid"), "a", greedy(20))),
               engine.submit(GenerationRequest(ids("one"), None, greedy(20)))]
    engine.start()
    try:
        for handle in handles:
            result = handle.result(WAIT)
            assert result.finish_reason == "error" and "simulated device failure" in result.error
            assert result.completion_tokens == 4  # step 0: the prefill's token and one decoded; steps 1, 2: one each
        after = engine.submit(GenerationRequest(ids("short"), "b", greedy(10))).result(WAIT)
        assert after.token_ids == reference(folders["b"], ids("short"), 10)
    finally:
        engine.shutdown()


def saved_adapter(name: str, folder: Path) -> str:
    """An adapter of method ``name`` (its contract-table config) on the tiny Llama, its trained parameters moved
    well away from their init (so it changes the greedy output), saved in ``folder``."""
    config, non_identity = CONFIGS[name]
    model = tiny_llama()
    method = build_method({"name": name, **config, **non_identity})
    if method.calibration_batches:
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        method.calibrate(model, [batch] * method.calibration_batches)
    method.apply(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for group in method.parameter_groups(model):
            for p in group.params:
                p.add_(torch.randn_like(p) * 0.3)
    return str(save_adapter(model, method, folder, base_model="tiny-llama", base_fingerprint=fingerprint(tiny_llama())))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_every_method_is_served_routed_or_in_its_own_group_or_refused(method: str, folders: dict[str, str],
                                                                       tmp_path: Path) -> None:
    """LoRA rows are routed in the base model's batch; every other method gets a model copy of its own, whose rows
    decode together each step next to the routed ones; prompt tuning (virtual tokens in the cache) is refused."""
    folder = saved_adapter(method, tmp_path / method)
    engine = engine_with(folders, "a")
    if method == "prompt_tuning":
        with pytest.raises(AdapterError, match="prompt_tuning.*one cache position per token"):
            engine.load_adapter("x", folder)
        assert set(engine.adapters()) == {"a"}
        return
    engine.load_adapter("x", folder)
    assert engine.adapters()["x"]["routed"] is (method == "lora") and engine.adapters()["x"]["method"] == method
    requests = [("x", "mid", 8), ("a", "long", 8), (None, "one", 8), ("x", "short", 6)]
    handles = [engine.submit(GenerationRequest(ids(p), a, greedy(n))) for a, p, n in requests]
    engine.start()
    try:
        for (adapter, prompt, n), handle in zip(requests, handles):
            source = {"x": folder, "a": folders["a"], None: None}[adapter]
            assert handle.result(WAIT).token_ids == reference(source, ids(prompt), n), adapter
        assert reference(folder, ids("mid"), 8) != reference(None, ids("mid"), 8)  # the adapter changes the output
        engine.unload_adapter("x")
        assert set(engine.adapters()) == {"a"}
    finally:
        engine.shutdown()
