"""The training attention equals transformers' sdpa attention: outputs and gradients, padded and packed."""

import copy

import pytest
import torch

from lmadapt.training import attention
from lmadapt.testing import tiny_llama
from lmadapt.training.attention import NAME, matmul_attention, training_attention


def _padded_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding, as the batcher makes it
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(24).expand(3, 24)}


def _packed_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24).clone()
    pos[1] = torch.cat([torch.arange(5), torch.arange(12), torch.arange(7)])
    return {"input_ids": ids, "position_ids": pos}  # no mask: restarts of position_ids separate the examples


def _logits_and_grads(model: torch.nn.Module, batch: dict, use_ours: bool) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    with training_attention(model, torch.device("cpu")) if use_ours else _nothing() as switched:
        assert switched is use_ours
        assert model.config._attn_implementation == (NAME if use_ours else "sdpa")
        logits = model(**batch, use_cache=False).logits
    real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    (logits.float()[real] ** 2).mean().backward()  # padding positions carry no loss, as in training
    return logits[real].detach().float(), [p.grad.float().clone() for p in model.parameters()]


class _nothing:
    def __enter__(self) -> bool:
        return False

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("batch_fn", [_padded_batch, _packed_batch], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_sdpa_outputs_and_gradients(batch_fn, dtype: torch.dtype, monkeypatch) -> None:
    # fp32 normally goes to sdpa; let it take the matmul path here so its math is checked at fp32 tolerance
    monkeypatch.setattr(attention, "MATMUL_DTYPES", (torch.float32, torch.bfloat16))
    model = tiny_llama(seed=2).to(dtype)  # 4 query heads over 2 KV heads: grouped-query attention
    model.config._attn_implementation = "sdpa"
    model.train()
    batch = batch_fn()
    ref_logits, ref_grads = _logits_and_grads(copy.deepcopy(model), batch, use_ours=False)
    logits, grads = _logits_and_grads(model, batch, use_ours=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(logits, ref_logits, **tol)
    for got, ref in zip(grads, ref_grads):
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        else:
            assert ((got - ref).norm() / ref.norm()).item() < 2e-2
    assert model.config._attn_implementation == "sdpa"  # restored


def test_fp32_goes_to_sdpa_and_half_precision_to_matmuls(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(attention, "_sdpa", lambda *a, **k: calls.append(a[1].dtype) or (None, None))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = torch.randn(1, 2, 5, 4, dtype=dtype)
        out, _ = matmul_attention(torch.nn.Module(), q, q, q, mask)
        assert (out is None) == (dtype == torch.float32)
    assert calls == [torch.float32]


def test_a_row_with_nothing_to_attend_to_gives_no_nan() -> None:
    q = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])[None, None]
    out, _ = matmul_attention(torch.nn.Module(), q, q, q, mask)
    assert torch.isfinite(out).all()


def test_generation_with_a_cache_inside_the_context_is_unchanged() -> None:
    model = tiny_llama(seed=2)
    model.config._attn_implementation = "sdpa"
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with training_attention(model, torch.device("cpu")):
        got = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(got, expected)


def test_other_devices_and_implementations_are_left_alone() -> None:
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    with training_attention(model, torch.device("cpu")) as switched:
        assert not switched and model.config._attn_implementation == "eager"
    model.config._attn_implementation = "sdpa"
    with training_attention(model, torch.device("meta")) as switched:
        assert not switched and model.config._attn_implementation == "sdpa"
