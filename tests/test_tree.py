"""lmadapt.tree: anchored target matching, module swaps and the adapters-off switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmadapt.errors import LmadaptError
from lmadapt.models.tree import (
    adapters_disabled,
    count_parameters,
    find_modules,
    freeze_all,
    name_matches,
    replace_module,
)
from lmadapt.testing import tiny_llama


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.lora_q_proj = nn.Linear(4, 4)  # a name that ends with "q_proj" as a string, not as a component
        self.q_proj_extra = nn.Linear(4, 4)  # a name that starts with "q_proj"
        self.v_proj = nn.Linear(4, 4)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attn()
        self.cross_attn = nn.Module()
        self.cross_attn.q_proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Toy(nn.Module):
    """model.layers.{0,1}.{self_attn,cross_attn}.*, plus an output head returned by get_output_embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(4, 8)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def _names(hits: list[tuple[str, nn.Module]]) -> list[str]:
    return [n for n, _ in hits]


@pytest.mark.parametrize(
    ("name", "target", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", "q_proj", True),
        ("model.layers.0.self_attn.q_proj", "self_attn.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
        ("q_proj", "q_proj", True),
        ("model.layers.0.self_attn.lora_q_proj", "q_proj", False),
        ("model.layers.0.self_attn.q_proj_extra", "q_proj", False),
        ("model.layers.0.self_attn.q_proj", "attn.q_proj", False),  # components, not characters
        ("model.layers.0.self_attn.q_proj", "self_attn", False),  # only trailing components
        ("q_proj", "self_attn.q_proj", False),  # longer target than name
        ("model.layers.0.self_attn.q_proj", "re:.*q_proj", True),
        ("model.layers.0.self_attn.q_proj", "re:q_proj", False),  # re: is a full match, not a search
        ("model.layers.0.self_attn.q_proj_extra", "re:.*q_proj", False),
        ("model.layers.10.self_attn.q_proj", r"re:.*layers\.1\..*", False),
        ("model.layers.1.self_attn.q_proj", r"re:.*layers\.1\..*", True),
    ],
)
def test_name_matches_is_anchored(name: str, target: str, expected: bool) -> None:
    assert name_matches(name, target) is expected


def test_plain_name_selects_whole_components_only() -> None:
    hits = _names(find_modules(Toy(), ["q_proj"]))
    assert hits == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.cross_attn.q_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.cross_attn.q_proj",
    ]


def test_dotted_name_narrows_to_a_parent() -> None:
    hits = _names(find_modules(Toy(), ["self_attn.q_proj"]))
    assert hits == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_regex_target_is_a_full_match() -> None:
    toy = Toy()
    assert _names(find_modules(toy, [r"re:.*layers\.1\.self_attn\..*q_proj"])) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.lora_q_proj",
    ]
    with pytest.raises(LmadaptError):  # would match as a search, not as a full match
        find_modules(toy, ["re:self_attn"])


def test_all_linear_skips_the_output_head() -> None:
    toy = Toy()
    hits = _names(find_modules(toy, ["all-linear"]))
    assert "lm_head" not in hits
    assert len(hits) == 2 * 5  # five linears per block, nothing else

    llama = tiny_llama()
    names = _names(find_modules(llama, ["all-linear"]))
    assert "lm_head" not in names
    assert len(names) == 2 * 7
    assert all(isinstance(llama.get_submodule(n), nn.Linear) for n in names)


def test_target_matching_nothing_raises_with_available_names() -> None:
    with pytest.raises(LmadaptError) as err:
        find_modules(Toy(), ["q_proj", "qproj"])
    msg = str(err.value)
    assert "'qproj'" in msg
    for available in ("q_proj", "v_proj", "lora_q_proj", "q_proj_extra", "lm_head"):
        assert available in msg
    assert "'q_proj'," not in msg.split("Available")[0]  # only the failing target is reported


def test_default_type_filter_is_linear() -> None:
    with pytest.raises(LmadaptError, match="'norm'"):
        find_modules(Toy(), ["norm"])
    assert len(find_modules(Toy(), ["norm"], types=(nn.LayerNorm,))) == 2


def test_exclude_by_name_and_by_regex() -> None:
    toy = Toy()
    hits = _names(find_modules(toy, ["q_proj"], exclude=["cross_attn.q_proj"]))
    assert hits == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    hits = _names(find_modules(toy, ["all-linear"], exclude=[r"re:model\.layers\.0\..*", "v_proj"]))
    assert hits == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.lora_q_proj",
        "model.layers.1.self_attn.q_proj_extra", "model.layers.1.cross_attn.q_proj",
    ]


def test_exclude_that_removes_everything_raises() -> None:
    with pytest.raises(LmadaptError, match="nothing would be adapted"):
        find_modules(Toy(), ["self_attn.q_proj"], exclude=["q_proj"])


def test_results_are_unique_and_in_model_order() -> None:
    toy = Toy()
    hits = _names(find_modules(toy, ["v_proj", "self_attn.q_proj", "q_proj"]))
    assert len(hits) == len(set(hits))
    order = [n for n, _ in toy.named_modules()]
    assert hits == sorted(hits, key=order.index)


def test_replace_module_keeps_the_path() -> None:
    toy = Toy()
    keys = list(toy.state_dict())
    old = toy.model.layers[1].self_attn.q_proj
    new = nn.Linear(4, 4)
    assert replace_module(toy, "model.layers.1.self_attn.q_proj", new) is old
    assert toy.get_submodule("model.layers.1.self_attn.q_proj") is new
    assert list(toy.state_dict()) == keys
    head = nn.Linear(4, 8)
    replace_module(toy, "lm_head", head)  # a top-level child
    assert toy.lm_head is head


def test_replace_module_keeps_train_eval_mode() -> None:
    """An adapter added to a model in eval mode must not run its dropout."""
    toy = Toy().eval()
    swapped = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 4))
    assert swapped.training
    replace_module(toy, "model.layers.0.self_attn.q_proj", swapped)
    assert not swapped.training and not swapped[0].training
    toy.train()
    fresh = nn.Linear(4, 4).eval()
    replace_module(toy, "model.layers.0.self_attn.v_proj", fresh)
    assert fresh.training


class _Switch(nn.Module):
    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self.adapter_enabled = enabled


def test_adapters_disabled_restores_flags_even_after_an_error() -> None:
    root = nn.Sequential(_Switch(True), nn.Sequential(_Switch(True)), _Switch(False))
    with pytest.raises(RuntimeError), adapters_disabled(root):
        assert [m.adapter_enabled for m in (root[0], root[1][0], root[2])] == [False, False, False]
        raise RuntimeError("boom")
    assert [m.adapter_enabled for m in (root[0], root[1][0], root[2])] == [True, True, False]


def test_adapters_disabled_nests_and_refuses_a_model_without_adapters() -> None:
    root = nn.Sequential(_Switch(True), nn.Linear(2, 2))
    with adapters_disabled(root), adapters_disabled(root):
        assert not root[0].adapter_enabled
    assert root[0].adapter_enabled
    with pytest.raises(LmadaptError, match="no adapter modules"), adapters_disabled(Toy()):
        pass  # would silently give the adapted (= only) outputs as "base" outputs


def test_freeze_all_and_count_parameters() -> None:
    toy = Toy()
    total = sum(p.numel() for p in toy.parameters())
    assert count_parameters(toy) == (total, total)
    freeze_all(toy)
    assert count_parameters(toy) == (0, total)
    toy.lm_head.weight.requires_grad_(True)
    assert count_parameters(toy) == (toy.lm_head.weight.numel(), total)


def test_all_linear_agrees_with_peft() -> None:
    """Our 'all-linear' picks the same modules as PEFT's on the tiny Llama."""
    from peft import LoraConfig, get_peft_model

    ours = _names(find_modules(tiny_llama(), ["all-linear"]))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    theirs = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
              if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), nn.Linear)]
    assert ours == theirs


def test_a_frozen_output_head_gets_contiguous_inputs_with_the_same_logits():
    from lmadapt.models.tree import freeze_all

    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    expected = model(input_ids=ids, logits_to_keep=1).logits
    seen = []
    freeze_all(model)
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    got = model(input_ids=ids, logits_to_keep=1).logits  # the head sees a hidden[:, -1:, :] slice
    assert seen == [True]
    torch.testing.assert_close(got, expected)
    freeze_all(model)  # idempotent: one hook
    assert len(model.lm_head._forward_pre_hooks) == 2  # ours and the test's spy
