"""MeteoRA against METHODS.md §10: the routing paths and the layer against hand computations, one expert equal to
its LoRA (lmadapt's and PEFT's), a self-contained adapter, task ids through the data pipeline, and gates that learn
to route each task to its own expert in the real loop.

"MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models", arXiv:2405.13053. Tolerances follow the dtype
(fp32 ~1e-5), not the method.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from lmadapt.adapters.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_adapter,
    read_adapter_info,
    save_adapter,
    write_record,
)
from lmadapt.api import load, merge
from lmadapt.data.batching import Batcher
from lmadapt.data.config import DataConfig
from lmadapt.data.dataset import load_splits
from lmadapt.data.tokens import IGNORE
from lmadapt.decoding.generation import generate
from lmadapt.errors import AdapterError, ConfigError, LmadaptError
from lmadapt.methods import StepContext, build_method
from lmadapt.methods.meteora import Meteora, gate_choices
from lmadapt.methods.meteora_layer import (
    MeteoraLinear,
    balance_loss,
    route,
    task_cross_entropy,
)
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama, tiny_lora_adapters, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
EXACT = 1e-6


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> list[str]:
    """Two LoRA experts of the tiny Llama: r 4 (alpha 8) and r 2 with rsLoRA (alpha 4), on all seven projections."""
    return tiny_lora_adapters(root=tmp_path_factory.mktemp("experts"))


def meteora(experts: list[str], **cfg: object) -> tuple[nn.Module, Meteora]:
    method = build_method({"name": "meteora", "experts": experts, **cfg})
    model = tiny_llama()
    method.apply(model)
    return model, method


# --- the routing and the layer against their formulas ----------------------------------------------------------

def test_both_weight_paths_follow_their_formulas_and_agree_at_t1() -> None:
    g = torch.randn(50, 5, generator=torch.Generator().manual_seed(0)) * 3
    w_ref, i_ref = route(g, 2, "reference")
    w_fast, i_fast = route(g, 2, "fast")
    assert torch.equal(i_ref, i_fast)
    close(w_ref, w_fast, atol=EXACT)
    p = g.softmax(-1)
    by_hand = torch.stack([p[t, i_ref[t]] / p[t, i_ref[t]].sum() for t in range(50)])
    close(w_ref, by_hand, atol=EXACT)
    w_hot, _ = route(g, 2, "fast", temperature=3.0)  # softmax(g_k / T) by hand
    top = g.topk(2, -1).values
    close(w_hot, torch.exp(top / 3) / torch.exp(top / 3).sum(-1, keepdim=True), atol=EXACT)
    assert not torch.allclose(w_hot, w_fast)
    w1, i1 = route(g, 1, "fast")
    assert torch.equal(w1, torch.ones(50, 1)) and torch.equal(i1[:, 0], g.argmax(-1))


def _layer(ranks: list[int], scales: list[float], k: int, gate: torch.Tensor | None = None, **kw: object
           ) -> tuple[nn.Linear, MeteoraLinear]:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    gate = torch.randn(len(ranks), 6) if gate is None else gate
    layer = MeteoraLinear(base, ranks, scales, gate, [f"e{i}" for i in range(len(ranks))], top_k=k, **kw)
    with torch.no_grad():
        layer.meteora_A.normal_()
        layer.meteora_B.normal_()
    return base, layer


def _expert(layer: MeteoraLinear, e: int, scale: float, x: torch.Tensor) -> torch.Tensor:
    """s_e B_e A_e x by hand (0 where the expert does not adapt the layer)."""
    pair = layer.factors(e)
    return torch.zeros(*x.shape[:-1], layer.out_features) if pair is None else scale * x @ pair[0].T @ pair[1].T


def test_the_layer_is_w0x_plus_the_weighted_top_k_experts() -> None:
    ranks, scales = [3, 0, 2], [0.5, 2.0, 1.5]  # expert 1 does not adapt this layer
    base, layer = _layer(ranks, scales, k=2)
    x = torch.randn(4, 7, 6)
    g = x @ layer.meteora_gate.T
    expected = x @ base.weight.T + base.bias
    for b in range(4):
        for t in range(7):
            top = g[b, t].topk(2)
            w = top.values.softmax(-1)
            for weight, e in zip(w, top.indices.tolist()):
                expected[b, t] += weight * _expert(layer, e, scales[e], x[b, t])
    with torch.no_grad():
        close(layer(x), expected)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.meteora_A.shape == (5, 6) and layer.meteora_B.shape == (5, 5)  # sum of ranks: 3 + 0 + 2


@pytest.mark.parametrize("e", [0, 1, 2])
def test_a_one_hot_gate_reproduces_expert_e_exactly(e: int) -> None:
    gate = torch.zeros(3, 6)
    gate[e] = 100.0  # x > 0 below: expert e's logit leads every other by > 100, so its weight is exactly 1
    scales = [0.5, 2.0, 1.5]
    base, layer = _layer([3, 4, 2], scales, k=2, gate=gate)
    x = torch.rand(5, 6) + 0.1
    with torch.no_grad():
        assert torch.equal(route(x @ gate.T, 2)[0][:, 0], torch.ones(5))
        close(layer(x), x @ base.weight.T + base.bias + _expert(layer, e, scales[e], x))  # fp32 sums of ~10


def test_routing_is_per_token() -> None:
    gate = torch.stack([torch.ones(6), -torch.ones(6)])  # x > 0 picks expert 0, x < 0 expert 1
    base, layer = _layer([2, 3], [1.0, 0.5], k=1, gate=gate)
    v = torch.rand(6) + 0.1
    x = torch.stack([v, -v, 2 * v])[None]  # one sequence of three tokens
    layer.capture = []
    with torch.no_grad():
        y = layer(x)
    assert layer.capture[0][0][:, 0].tolist() == [0, 1, 0]
    plain = x @ base.weight.T + base.bias
    close(y[0, 0], plain[0, 0] + _expert(layer, 0, 1.0, x[0, 0]))
    close(y[0, 1], plain[0, 1] + _expert(layer, 1, 0.5, x[0, 1]))


def test_task_cross_entropy_is_the_concatenated_ce_of_every_gate_shifted_by_one() -> None:
    gen = torch.Generator().manual_seed(0)
    gates = [torch.randn(2, 4, 3, generator=gen) for _ in range(2)]
    task_ids = torch.tensor([[IGNORE, 0, 0, 0], [IGNORE, 2, 2, IGNORE]])
    terms = [-F.log_softmax(g[b, t], -1)[task_ids[b, t + 1]]
             for g in gates for b in range(2) for t in range(3) if task_ids[b, t + 1] != IGNORE]
    assert len(terms) == 10  # 5 positions x 2 gates
    close(task_cross_entropy(gates, task_ids), torch.stack(terms).mean(), atol=EXACT)


def test_balance_loss_is_switch_transformer_s_and_one_when_balanced() -> None:
    g = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]])  # (1, 4, 2)
    mask = torch.tensor([[1, 1, 1, 0]])
    p = g[0, :3].softmax(-1)
    f = torch.tensor([2 / 3, 1 / 3])  # top-1 choices of the three kept tokens
    close(balance_loss([g], 1, mask), 2 * (f * p.mean(0)).sum(), atol=EXACT)
    close(balance_loss([torch.zeros(1, 5, 4)], 2), torch.tensor(1.0), atol=EXACT)  # uniform: N * sum (1/N)(1/N)


# --- in a model -------------------------------------------------------------------------------------------

def test_one_expert_at_k1_equals_its_lora_in_lmadapt_and_in_peft(experts: list[str]) -> None:
    for path in experts:  # r 4, and r 2 with rsLoRA
        model, _ = meteora([path], top_k=1)
        lora = tiny_llama()
        load_adapter(lora, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft = PeftModel.from_pretrained(tiny_llama(), path).eval()
        expected = logits(lora)
        assert (expected - logits(tiny_llama())).abs().max() > 1e-3, "the comparison would be vacuous"
        close(logits(model), expected)
        close(logits(model), logits(peft))
        reference, _ = meteora([path], top_k=1, weights="reference")
        close(logits(reference), expected)


def test_experts_from_peft_with_another_rank_alpha_rslora_and_fewer_modules(experts: list[str], tmp_path: Path) -> None:
    torch.manual_seed(3)
    peft = get_peft_model(tiny_llama(), PeftLoraConfig(r=3, lora_alpha=5, use_rslora=True, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(tmp_path / "peft")
    model, method = meteora([str(tmp_path / "peft")], top_k=1)
    close(logits(model), logits(peft.eval()))
    model, method = meteora([experts[0], str(tmp_path / "peft")], expert_names=["mine", "theirs"])
    layout = method.config.layout
    assert [(e["name"], e["r"], e["alpha"], e["rslora"], len(e["modules"])) for e in layout] == [
        ("mine", 4, 8.0, False, 14), ("theirs", 3, 5.0, True, 4)]
    layers = dict(modules_of_type(model, MeteoraLinear))
    q, k = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.k_proj"]
    assert q.spans == [(0, 4), (4, 7)] and k.spans == [(0, 4), None]
    assert q.column_scale.tolist() == pytest.approx([2.0] * 4 + [5 / math.sqrt(3)] * 3)


def test_gates_are_seeded_normal_and_only_they_train_by_default(experts: list[str]) -> None:
    model, method = meteora(experts)
    again, _ = meteora(experts)
    other, _ = meteora(experts, gate_seed=1, gate_init_std=0.5)
    gates = [m.meteora_gate for _, m in modules_of_type(model, MeteoraLinear)]
    assert all(torch.equal(a.meteora_gate, b) for (_, a), b in zip(modules_of_type(again, MeteoraLinear), gates))
    drawn = torch.cat([g.reshape(-1) for g in gates])
    assert abs(drawn.mean()) < 0.05 and abs(drawn.std() - 1) < 0.05
    second = torch.cat([m.meteora_gate.reshape(-1) for _, m in modules_of_type(other, MeteoraLinear)])
    assert abs(second.std() - 0.5) < 0.03 and not torch.allclose(second, drawn / 2)
    assert [(g.name, len(g.params)) for g in method.parameter_groups(model)] == [("meteora_gate", 14)]
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"meteora_gate"}
    model, method = meteora(experts, train_loras=True)
    assert [(g.name, len(g.params)) for g in method.parameter_groups(model)] == [
        ("meteora_gate", 14), ("meteora_experts", 28)]


def _trained(experts: list[str]) -> tuple[nn.Module, Meteora]:
    model, method = meteora(experts)
    opt = torch.optim.AdamW([p for g in method.parameter_groups(model) for p in g.params], lr=5e-2)
    model.train()
    model(input_ids=ids(1), labels=ids(1)).loss.backward()  # k = 2 of 2: the LM loss reaches the gates
    opt.step()
    model.eval()
    return model, method


def test_the_adapter_is_self_contained_reloads_exactly_and_is_not_peft_s(experts: list[str], tmp_path: Path) -> None:
    copies = [shutil.copytree(p, tmp_path / f"expert{i}") for i, p in enumerate(experts)]
    model, method = _trained([str(c) for c in copies])
    expected = logits(model)
    save_adapter(model, method, tmp_path / "adapter", base_model="tiny", base_fingerprint=fingerprint(tiny_llama()))
    for c in copies:
        shutil.rmtree(c)  # loading must not need them
    fresh = tiny_llama()
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh), expected)
    assert [e["name"] for e in loaded.config.layout] == ["expert0", "expert1"]
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert "peft_type" not in config and config["lmadapt"]["method"]["name"] == "meteora"
    with adapters_disabled(fresh):
        close(logits(fresh), logits(tiny_llama()), atol=EXACT)
    with pytest.raises(LmadaptError, match="method 'meteora' cannot be merged"):
        merge(None, tmp_path / "adapter", tmp_path / "merged")
    with pytest.raises(LmadaptError, match="meteora adapter cannot be merged"):
        loaded.merge(fresh)


def test_generation_through_lmadapt_uses_the_gates_per_step(experts: list[str]) -> None:
    tok = tiny_tokenizer()
    model, _ = meteora(experts[:1], top_k=1)
    lora = tiny_llama()
    load_adapter(lora, experts[0])
    prompts = ["hello there", "a b c"]
    ours = generate(model, tok, prompts, max_new_tokens=8)
    assert ours == generate(lora, tok, prompts, max_new_tokens=8) and all(ours)
    choices = gate_choices(model, tok, "hello")
    assert choices.tokens == list("hello") and choices.share() == {"lora0": 1.0}


def test_bad_experts_are_refused_with_the_entry_and_the_reason(experts: list[str], tmp_path: Path) -> None:
    other = tiny_llama()
    miss = build_method({"name": "miss", "r": 4})
    miss.apply(other)
    save_adapter(other, miss, tmp_path / "miss", base_model="tiny", base_fingerprint=fingerprint(tiny_llama()))
    wrong_base = tiny_lora_adapters({"r": 2}, root=tmp_path / "wb")[0]
    info = read_adapter_info(wrong_base)
    write_record(wrong_base, {"method": info.method, "base_model": "other", "base_fingerprint": "0" * 16})
    cases = [([str(tmp_path / "nowhere")], r"method.experts\[0\]: .*nowhere is not an adapter folder"),
             ([experts[0], str(tmp_path / "miss")], r"method.experts\[1\]: .* holds a 'miss' adapter"),
             ([wrong_base], r"method.experts\[0\]: .* was trained on base 'other'")]
    for paths, message in cases:
        with pytest.raises(AdapterError, match=message):
            meteora(paths, top_k=1)
    with pytest.raises(LmadaptError, match="no expert adapts"):
        meteora(experts, target_modules=["lm_head"])
    with pytest.raises(ConfigError) as err:
        build_method({"name": "meteora", "experts": experts, "top_k": 3, "weights": "reference", "temperature": 2,
                      "expert_names": ["a"]})
    assert len(err.value.problems) == 3  # every problem at once: names, top_k, temperature


# --- task ids through the data pipeline, and gates trained in the real loop --------------------------------------

def _task_files(root: Path) -> list[str]:
    rng = random.Random(0)
    files = []
    for name, alphabet in (("letters", "abcdefghij "), ("digits", "0123456789 ")):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(rng.randint(12, 24)))})
                                + "\n" for _ in range(32)))
        files.append(str(path))
    return files


@pytest.mark.parametrize("packing", [False, True])
def test_train_tasks_reach_the_batch_per_token(tmp_path: Path, packing: bool) -> None:
    files = _task_files(tmp_path)
    tok = tiny_tokenizer()
    train_set, val_set, _ = load_splits(DataConfig(train=files, train_tasks=[1, 0], validation_fraction=0.25,
                                                   max_length=64), tok)
    assert train_set.tasks == [1 if "letters" in s else 0 for s in train_set.sources]
    assert val_set.tasks == [1 if "letters" in s else 0 for s in val_set.sources] and set(train_set.tasks) == {0, 1}
    batcher = Batcher(train_set, batch_size=4, max_length=64, packing=packing, group_by_length=False,
                      pad_id=tok.pad_token_id, seed=0)
    plan = batcher.batches(0)[0]
    batch = batcher.collate(plan)
    for b, row in enumerate(plan):
        pos = 0
        for i in row:
            n = batcher.lengths[i]
            assert batch["task_ids"][b, pos] == IGNORE and (batch["task_ids"][b, pos + 1:pos + n] == train_set.tasks[i]).all()
            pos += n
        assert (batch["task_ids"][b, pos:] == IGNORE).all()
    plain, _, _ = load_splits(DataConfig(train=files, max_length=64), tok)
    assert "task_ids" not in Batcher(plain, batch_size=4, max_length=64, packing=packing, group_by_length=False,
                                     pad_id=tok.pad_token_id, seed=0).collate([0, 1])
    with pytest.raises(ConfigError, match="train_tasks: gives 1 task id"):
        load_splits(DataConfig(train=files, train_tasks=[0]), tok)
    with pytest.raises(ConfigError, match="belongs to two tasks"):
        load_splits(DataConfig(train=[files[0], str(tmp_path / "*.jsonl")], train_tasks=[0, 1]), tok)


def test_gate_loss_task_needs_task_ids(experts: list[str]) -> None:
    model, method = meteora(experts)
    model.train()
    model(input_ids=ids())
    ctx = StepContext(model, {"input_ids": ids()}, 0, 1)
    with pytest.raises(LmadaptError, match="set data.train_tasks"):
        method.extra_loss(ctx)
    model(input_ids=ids())
    with pytest.raises(LmadaptError, match="names task 2, but there are 2 experts"):
        method.extra_loss(StepContext(model, {"task_ids": torch.full((2, 12), 2)}, 0, 1))
    # a saved adapter's section (layout filled) builds empty experts: training on it without its tensors is refused
    shell = build_method({"name": "meteora", **{k: v for k, v in vars(method.config).items() if k != "experts"}})
    bare = tiny_llama()
    shell.apply(bare)
    assert all(torch.count_nonzero(m.meteora_A) == 0 for _, m in modules_of_type(bare, MeteoraLinear))
    with pytest.raises(LmadaptError, match="set init_adapter to that folder"):
        shell.extra_loss(StepContext(bare, {"input_ids": ids()}, 0, 1))
    shell.load_adapter_state(bare, method.adapter_state(model))
    close(logits(bare), logits(model), atol=0)


def _gate_ce(model: nn.Module, method: Meteora, tok: object, files: list[str]) -> float:
    """The gate cross-entropy (without its coefficient) on all rows of the two task files."""
    data, _, _ = load_splits(DataConfig(train=files, train_tasks=[0, 1], max_length=64), tok)
    batch = Batcher(data, batch_size=64, max_length=64, packing=False, group_by_length=False, pad_id=tok.pad_token_id,
                    seed=0).collate(list(range(len(data))))
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return float(method.extra_loss(StepContext(model, batch, 0, 1)).detach()) / method.config.task_loss_coef


def test_trained_gates_route_each_task_to_its_expert(experts: list[str], tiny_model_dir: Path, tmp_path: Path) -> None:
    files, tok = _task_files(tmp_path), tiny_tokenizer()
    spec = {"name": "meteora", "experts": experts, "top_k": 1}
    cfg = {"model": {"name_or_path": str(tiny_model_dir)},
           "data": {"train": files, "train_tasks": [0, 1], "max_length": 64}, "method": spec,
           "train": {"lr": 5e-2, "batch_size": 8, "max_steps": 30, "tensorboard": False, "schedule": "constant",
                     "threads": 1},
           "output_dir": str(tmp_path / "run")}
    before, method = meteora(experts, top_k=1)
    ce_before = _gate_ce(before, method, tok, files)
    result = train(cfg, progress=False)
    model, tok, loaded = load(adapter=result.adapter_dir)  # as `lmadapt generate --adapter` loads it
    ce_after = _gate_ce(model, loaded, tok, files)
    print(f"gate CE {ce_before:.3f} -> {ce_after:.3f}")
    assert ce_after < 0.2 * ce_before, (ce_before, ce_after)
    letters = gate_choices(model, tok, "abcdefghij abc")
    digits = gate_choices(model, tok, "0123456789 012")
    print(f"own-expert share: letters {letters.share()['lora0']:.3f}, digits {digits.share()['lora1']:.3f}")
    assert letters.share()["lora0"] > 0.9 and digits.share()["lora1"] > 0.9, (letters.share(), digits.share())
    mixed = [max(share, key=share.get) for share in gate_choices(model, tok, "abcabc 123123").per_token()]
    assert mixed[:6] == ["lora0"] * 6 and mixed[-6:] == ["lora1"] * 6  # one sequence, two experts


def test_the_gate_loss_trains_the_same_under_gradient_checkpointing(experts: list[str], tiny_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    """The gate logits are kept from inside checkpointed blocks; their gradients must survive the recomputation."""
    files = _task_files(tmp_path)
    saved = []
    for checkpointing in (False, True):
        cfg = {"model": {"name_or_path": str(tiny_model_dir)},
               "data": {"train": files, "train_tasks": [0, 1], "max_length": 64},
               "method": {"name": "meteora", "experts": experts},
               "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 2, "tensorboard": False, "threads": 1,
                         "gradient_checkpointing": checkpointing},
               "output_dir": str(tmp_path / f"run{checkpointing}")}
        saved.append(load_file(str(train(cfg, progress=False).adapter_dir / WEIGHTS_NAME)))
    start, _ = meteora(experts)
    gate = "base_model.model.model.layers.0.self_attn.q_proj.meteora_gate"
    assert not torch.equal(saved[0][gate], dict(start.named_parameters())["model.layers.0.self_attn.q_proj.meteora_gate"])
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
