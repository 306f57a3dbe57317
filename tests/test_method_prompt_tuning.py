"""Prompt tuning: the forward against the base model run by hand on [P; E(x)], PEFT's PeftModelForCausalLM with the
same prompt (logits on the real tokens, the loss with prompt masking), the adapter folder both ways with PEFT, PEFT's
TEXT init, the base model when disabled or N = 0, the mask and positions the decoder is given, packed rows, KV-cached
decoding against recomputation (transformers' generate, lmadapt's generate and its cached scoring), bf16, and the
real training loop."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import PromptTuningConfig as PeftPromptTuningConfig
from safetensors.torch import load_file
from torch import nn

from lmadapt.adapters.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_adapter,
    save_adapter,
)
from lmadapt.decoding.generation import generate
from lmadapt.decoding.scoring import score_continuations
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import build_method
from lmadapt.methods.prompt_tuning import CACHE_MARK, PromptTuning, SoftPrompt
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5  # fp32 logits after a few matmuls
BF16_LOGITS_ATOL = 5e-2  # tiny Llama logits (|z| < 1) after two bf16 blocks
N = 4
VOCAB = 260


def ids(seed: int = 0, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def prompt(model: nn.Module) -> nn.Parameter:
    return next(m for _, m in modules_of_type(model, SoftPrompt)).prompt_embeddings


def tuned(n: int = N, seed: int = 1, **cfg: object) -> tuple[nn.Module, PromptTuning]:
    """A tiny Llama with an n-token soft prompt of N(0, 1) values (from ``seed``)."""
    method = build_method({"name": "prompt_tuning", "num_virtual_tokens": n, **cfg})
    model = tiny_llama()
    method.prepare(model, tiny_tokenizer())
    method.apply(model)
    with torch.no_grad():
        prompt(model).copy_(torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)))
    return model, method


def right_padded() -> torch.Tensor:
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return mask


def peft_twin(p: torch.Tensor) -> nn.Module:
    """PEFT's prompt tuning of the same tiny Llama, holding the prompt ``p``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(tiny_llama(), PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(p)
    return peft.eval()


# --- the equation, the base model, what the decoder is given -----------------------------------------------
@torch.no_grad()
def test_forward_is_the_base_model_on_prompt_then_tokens() -> None:
    model, _ = tuned()
    base = tiny_llama()
    x, mask = ids(), right_padded()
    embeds = torch.cat([prompt(model).expand(2, -1, -1), base.get_input_embeddings()(x)], dim=1)
    expected = base(inputs_embeds=embeds).logits[:, N:]
    got = model(input_ids=x).logits
    assert got.shape == (2, 12, VOCAB)
    close(got, expected)
    assert (got - base(input_ids=x).logits).abs().max() > 0.1  # the prompt matters here
    # lmadapt's padded batches: a right-padding mask and positions 0..L-1 (the real tokens are compared)
    masked = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), mask], 1))
    got = model(input_ids=x, attention_mask=mask, position_ids=torch.arange(12).expand(2, -1)).logits
    close(got[mask.bool()], masked.logits[:, N:][mask.bool()])


@torch.no_grad()
def test_disabled_or_no_virtual_tokens_is_the_base_model() -> None:
    x, mask = ids(), right_padded()
    base = tiny_llama()(input_ids=x, attention_mask=mask).logits
    model, _ = tuned()
    with adapters_disabled(model):
        close(model(input_ids=x, attention_mask=mask).logits, base, atol=0)
    assert (model(input_ids=x, attention_mask=mask).logits - base).abs().max() > 0.1  # switched back on
    empty, _ = tuned(n=0)
    close(empty(input_ids=x, attention_mask=mask).logits, base, atol=0)


@torch.no_grad()
def test_the_decoder_gets_the_prompt_a_wider_mask_and_shifted_positions() -> None:
    model, _ = tuned()
    seen: dict = {}
    model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    x, mask = ids(), right_padded()
    labels = x.masked_fill(mask == 0, -100)
    out = model(input_ids=x, attention_mask=mask, position_ids=torch.arange(12).expand(2, -1), labels=labels)
    assert seen["input_ids"] is None and seen["inputs_embeds"].shape == (2, N + 12, 64)
    assert torch.equal(seen["inputs_embeds"][:, :N], prompt(model).expand(2, -1, -1))
    assert torch.equal(seen["attention_mask"], torch.cat([torch.ones(2, N, dtype=torch.long), mask], 1))
    assert torch.equal(seen["position_ids"], torch.arange(N + 12).expand(2, -1))
    assert out.logits.shape == (2, 12, VOCAB) and torch.isfinite(out.loss)  # the caller's labels fit as they are


# --- PEFT ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_logits_and_loss_equal_peft_s_with_the_same_prompt() -> None:
    model, _ = tuned()
    peft = peft_twin(prompt(model))
    x, mask = ids(), right_padded()
    labels = x.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # prompt masking; PEFT also pads its virtual positions with -100
    ours = model(input_ids=x, attention_mask=mask, labels=labels)
    theirs = peft(input_ids=x, attention_mask=mask, labels=labels)
    assert theirs.logits.shape == (2, N + 12, VOCAB)
    close(ours.logits[mask.bool()], theirs.logits[:, N:][mask.bool()])
    close(ours.loss, theirs.loss)


def test_peft_loads_our_folder_and_we_load_peft_s(tmp_path: Path) -> None:
    model, method = tuned()
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    save_adapter(model, method, tmp_path / "ours", base_model="tiny", base_fingerprint=None)
    saved = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert list(saved) == ["prompt_embeddings"] and torch.equal(saved["prompt_embeddings"], prompt(model))
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert {k: config[k] for k in ("peft_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                   "num_attention_heads", "num_layers", "prompt_tuning_init")} == {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": N, "token_dim": 64, "num_transformer_submodules": 1,
        "num_attention_heads": 4, "num_layers": 2, "prompt_tuning_init": "SAMPLE_VOCAB"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        close(theirs(input_ids=x).logits[:, N:], expected)

    peft = peft_twin(torch.randn(N, 64, generator=torch.Generator().manual_seed(2)))
    peft.save_pretrained(tmp_path / "peft")
    fresh = tiny_llama()
    loaded = load_adapter(fresh, tmp_path / "peft")
    assert loaded.name == "prompt_tuning" and loaded.config.num_virtual_tokens == N
    assert loaded.config.init == "random"
    with torch.no_grad():
        close(fresh(input_ids=x).logits, peft(input_ids=x).logits[:, N:])


@pytest.mark.parametrize("text", ["Hi", "Classify the topic:"])  # byte tokens: 2 repeated to 4; 19 cut to 4
def test_text_init_is_peft_s_and_its_folder_loads_in_peft(text: str, tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    method = build_method({"name": "prompt_tuning", "num_virtual_tokens": N, "init": "text", "init_text": text})
    model = tiny_llama()
    method.prepare(model, tokenizer)
    method.apply(model)
    token_ids = tokenizer(text)["input_ids"]
    close(prompt(model), model.get_input_embeddings().weight[(token_ids * N)[:N]], atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(tiny_llama(), PeftPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(tmp_path / "tokenizer")))
    close(prompt(model), peft.prompt_encoder["default"].embedding.weight, atol=0)

    save_adapter(model, method, tmp_path / "ours", base_model="tiny", base_fingerprint=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert theirs.peft_config["default"].prompt_tuning_init_text == text
    assert PromptTuning.config_from_peft(method.adapter_config()) == {"num_virtual_tokens": N, "init": "text",
                                                                      "init_text": text}


def test_sample_vocab_takes_embedding_rows_and_random_is_standard_normal() -> None:
    torch.manual_seed(0)
    method = build_method({"name": "prompt_tuning", "num_virtual_tokens": 16})
    model = tiny_llama()
    method.apply(model)
    rows = model.get_input_embeddings().weight
    assert (prompt(model)[:, None] == rows[None]).all(-1).any(-1).all()  # each one is a row of the matrix
    method = build_method({"name": "prompt_tuning", "num_virtual_tokens": 64, "init": "random"})
    model = tiny_llama()
    method.apply(model)
    p = prompt(model).detach()
    assert p.dtype == torch.float32 and abs(float(p.mean())) < 0.1 and 0.9 < float(p.std()) < 1.1


# --- packed rows -------------------------------------------------------------------------------------------
@torch.no_grad()
def test_packed_rows_give_every_document_the_prompt() -> None:
    """Rows as lmadapt packs them: no mask, positions restarting at each document (the padding is one too)."""
    model, _ = tuned()
    a, b, c = ids(5, (1, 5))[0], ids(6, (1, 7))[0], ids(7, (1, 9))[0]
    pad = torch.zeros(5, dtype=torch.long)
    x = torch.stack([torch.cat([a, b, pad[:2]]), torch.cat([c, pad])])
    positions = torch.stack([torch.cat([torch.arange(5), torch.arange(7), torch.arange(2)]),
                             torch.cat([torch.arange(9), torch.arange(5)])])
    got = model(input_ids=x, position_ids=positions, use_cache=False).logits
    assert got.shape == (2, 14, VOCAB)

    def alone(doc: torch.Tensor) -> torch.Tensor:
        return model(input_ids=doc[None], use_cache=False).logits[0]

    close(got[0, :5], alone(a))
    close(got[0, 5:12], alone(b))
    close(got[1, :9], alone(c))


# --- decoding with the KV cache ------------------------------------------------------------------------------
@torch.no_grad()
def test_greedy_decoding_with_the_cache_equals_recomputing_without_it() -> None:
    model, _ = tuned()
    model.generation_config.eos_token_id = None  # always 8 new tokens
    calls: list[tuple] = []
    model.model.register_forward_pre_hook(
        lambda m, args, kw: calls.append((None if kw["inputs_embeds"] is None else kw["inputs_embeds"].shape[1],
                                          kw["attention_mask"] is None or kw["attention_mask"].shape[1])),
        with_kwargs=True)
    x = ids(3, (1, 7))
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                         use_cache=True, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    assert out.sequences.shape == (1, 15)
    assert calls[0][0] == N + 7 and all(embeds is None for embeds, _ in calls[1:])  # the prompt went in once
    assert out.past_key_values.get_seq_length() == N + 14 and getattr(out.past_key_values, CACHE_MARK) == N
    seq = x
    for step in range(8):
        logits = model(input_ids=seq, use_cache=False).logits[:, -1]
        close(out.logits[step], logits)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)


def test_lmadapt_generate_with_left_padding_equals_one_prompt_at_a_time() -> None:
    model, _ = tuned()
    tokenizer = tiny_tokenizer()
    prompts = ["ab", "hello there", "x y z w v"]
    together = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert together == [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    with adapters_disabled(model):
        assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) != together


def test_cached_scoring_equals_scoring_whole_rows() -> None:
    model, _ = tuned()
    context, continuations = list(range(40, 50)), [[60, 61, 62], [70], [80, 81]]
    cached = score_continuations(model, context, continuations, strategy="cached")
    whole = score_continuations(model, context, continuations, strategy="batched")
    for a, b in zip(cached, whole, strict=True):
        close(a, b)
    with adapters_disabled(model):  # a cache filled without the prompt goes on without it: the base model
        off = score_continuations(model, context, continuations, strategy="cached")
    for a, b in zip(off, score_continuations(tiny_llama(), context, continuations, strategy="cached"), strict=True):
        close(a, b)
    assert (off[0] - cached[0]).abs().max() > 1e-3


# --- merge, unload, config ------------------------------------------------------------------------------------
@torch.no_grad()
def test_merge_is_refused_and_unload_gives_the_plain_model_back() -> None:
    model, method = tuned()
    with pytest.raises(LmadaptError, match="cannot be merged into the base weights"):
        method.merge(model)
    method.unload(model)
    assert list(model.state_dict()) == list(tiny_llama().state_dict())
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    close(model(input_ids=ids()).logits, tiny_llama()(input_ids=ids()).logits, atol=0)


def test_applying_twice_is_refused() -> None:
    model, method = tuned()
    with pytest.raises(LmadaptError, match="was the method applied twice"):
        method.apply(model)


def test_config_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        build_method({"name": "prompt_tuning", "num_virtual_tokens": -1, "init": "text"})
    assert "num_virtual_tokens: must be >= 0" in str(err.value) and "init 'text' needs the text" in str(err.value)
    with pytest.raises(ConfigError, match="only init 'text' reads it"):
        build_method({"name": "prompt_tuning", "init_text": "Topic:"})


def test_text_init_without_the_tokenizer_is_refused() -> None:
    method = build_method({"name": "prompt_tuning", "init": "text", "init_text": "Topic:"})
    with pytest.raises(LmadaptError, match=r"call method.prepare\(model, tokenizer\)"):
        method.apply(tiny_llama())


def test_peft_configs_and_tensors_lmadapt_cannot_use_are_refused() -> None:
    with pytest.raises(ValueError, match="decoder-only"):
        PromptTuning.config_from_peft({"task_type": "SEQ_2_SEQ_LM", "num_transformer_submodules": 2,
                                       "num_virtual_tokens": 4})
    with pytest.raises(ValueError, match="prompt_tuning_init 'MIXED'"):
        PromptTuning.config_from_peft({"task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
                                       "prompt_tuning_init": "MIXED"})
    model, method = tuned()
    with pytest.raises(KeyError, match="holds one tensor"):
        method.load_adapter_state(model, {"prompt_embeddings": prompt(model), "extra": prompt(model)})
    with pytest.raises(ValueError, match=r"saved shape \(5, 64\) != the model's \(4, 64\)"):
        method.load_adapter_state(model, {"prompt_embeddings": torch.zeros(5, 64)})


# --- bf16 and the real loop -------------------------------------------------------------------------------------
def test_bf16_model_with_an_fp32_prompt() -> None:
    model, _ = tuned()
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            close(model(input_ids=x).logits.float(), ref, atol=BF16_LOGITS_ATOL)
    model.to(torch.bfloat16)  # a bf16-stored base; the prompt kept in fp32 as training keeps it
    prompt(model).data = prompt(model).data.float()
    got = model(input_ids=x).logits
    assert got.dtype == torch.bfloat16
    close(got.detach().float(), ref, atol=BF16_LOGITS_ATOL)
    got.float().square().mean().backward()
    assert prompt(model).grad.dtype == torch.float32 and prompt(model).grad.abs().sum() > 0


@pytest.mark.parametrize(("precision", "batching", "init"), [
    ("fp32", "packed", {"init": "text", "init_text": "Topic of this text:"}),
    ("bf16", "length_grouped", {}),
])
def test_trains_through_the_loop_and_the_adapter_reloads(run_config, tmp_path: Path, tiny_model_dir,
                                                         precision: str, batching: str, init: dict) -> None:
    import lmadapt

    run_config["method"] = {"name": "prompt_tuning", "num_virtual_tokens": N, **init}
    run_config["data"]["batching"] = batching
    run_config["train"].update({"max_steps": 4, "precision": precision, "lr": 3e-2})
    result = train(run_config, progress=False)
    saved = load_file(result.adapter_dir / WEIGHTS_NAME)["prompt_embeddings"]
    if init:  # 4 Adam steps of 3e-2 move each value by at most 0.12 from the text's embeddings
        first = tiny_tokenizer()(init["init_text"])["input_ids"][:N]
        start = tiny_llama().get_input_embeddings().weight.detach()[first]
        assert 1e-3 < float((saved - start).abs().max()) < 0.13
    model, _, _ = lmadapt.load(str(tiny_model_dir), adapter=result.adapter_dir)
    fresh, _ = tuned()
    with torch.no_grad():
        prompt(fresh).copy_(saved)
        close(model.float()(input_ids=ids()).logits, fresh(input_ids=ids()).logits)
