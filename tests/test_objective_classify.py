"""Sequence classification / regression heads (objective ``classify``) and layer-wise causal-mask removal.

METHODS.md §16's checks: with every layer locked the model is the causal model; an unmasked layer lets a token see
later tokens (a locked one does not); pads stay masked; the last-token index and the masked mean ignore pads. Also
the losses against their formulas, the head saved and loaded back, the data format, and training through the loop.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import TOPICS, write_jsonl
from safetensors.torch import load_file
from test_method_matrix import killed_at

from lmadapt.adapters.format import (
    load_adapter_contents,
    read_objective_tensors,
    save_adapter,
)
from lmadapt.data import Batcher, DataConfig, load_splits
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.evaluation.tasks.head_classification import f1_scores, head_logits
from lmadapt.methods import build_method
from lmadapt.models.tree import adapters_disabled
from lmadapt.models.unmask import resolve_layers, unmask_layers, unmasked_layers
from lmadapt.objectives.base import build_objective
from lmadapt.objectives.classify import (
    classification_loss,
    export_peft_classifier,
    last_token_index,
    multi_hot,
    pooled_logits,
    predict,
)
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama, tiny_tokenizer
from lmadapt.training.attention import training_attention

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = sorted(TOPICS)


def padded_batch(padding: str = "right", seed: int = 0) -> dict:
    """Three rows of 9, 6 and 4 real tokens, padded with id 259 on the right or left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for b, n in enumerate((9, 6, 4)):
        real = slice(0, n) if padding == "right" else slice(9 - n, 9)
        mask[b, real] = 1
    ids[mask == 0] = 259
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def hidden(model, batch) -> torch.Tensor:
    return model.base_model(**batch, use_cache=False).last_hidden_state


def attached(unmask="none", last=0, **fields):
    model = tiny_llama()
    objective = build_objective({"name": "classify", "labels": NAMES, "unmask_layers": unmask, "unmask_last": last,
                                 **fields})
    objective.setup(model, None, torch.device("cpu"))
    return model, objective


# --- the mask --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["right", "left"])
def test_with_every_layer_locked_the_model_is_the_causal_model(padding):
    batch = padded_batch(padding)
    model, objective = attached("none")
    assert unmasked_layers(model) == [] and objective.causal_attention
    torch.testing.assert_close(hidden(model, batch), hidden(tiny_llama(), batch), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_unmasking_every_layer_is_transformers_bidirectional_attention(impl, padding):
    """Reference: transformers' own non-causal path (config.is_causal = False builds a padding-only mask for every
    layer), computed by the eager kernel."""
    batch = padded_batch(padding)
    model, objective = attached("all")
    model.set_attn_implementation(impl)
    assert unmasked_layers(model) == [0, 1] and not objective.causal_attention
    ref = tiny_llama()
    ref.set_attn_implementation("eager")
    ref.config.is_causal = False
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden(model, batch)[real], hidden(ref, batch)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unmask", [["none", 0], ["all", 0], [[1], 0], ["none", 1], [[-2], 0]])
def test_a_later_token_changes_earlier_states_only_through_unmasked_layers(unmask):
    """Position 2's final state moves when token 5 changes iff some layer is unmasked; with only layer 1 unmasked,
    layer 0's output at position 2 still does not move."""
    spec, last = unmask
    model, _ = attached(spec, last)
    a = {"input_ids": torch.randint(0, 250, (1, 8), generator=torch.Generator().manual_seed(1))}
    b = {"input_ids": a["input_ids"].clone()}
    b["input_ids"][0, 5] = (a["input_ids"][0, 5] + 7) % 250
    with torch.no_grad():
        out_a = model.base_model(**a, use_cache=False, output_hidden_states=True)
        out_b = model.base_model(**b, use_cache=False, output_hidden_states=True)
    moved = (out_a.last_hidden_state[0, :5] - out_b.last_hidden_state[0, :5]).abs().amax(-1)
    if unmasked_layers(model):
        assert bool((moved > 1e-3).all())
    else:
        assert float(moved.max()) == 0.0
    if unmasked_layers(model) == [1]:  # hidden_states[1] is layer 0's output
        assert float((out_a.hidden_states[1][0, :5] - out_b.hidden_states[1][0, :5]).abs().max()) == 0.0


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("unmask", ["none", "all"])
def test_pads_stay_masked(padding, unmask):
    """Changing the ids at pad positions changes no real position's state (sdpa, eager, and lmadapt's CPU
    attention in bf16, which also gets a None mask when a row has no pads)."""
    batch = padded_batch(padding)
    other = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 17)}
    real = batch["attention_mask"].bool()
    for impl in ("sdpa", "eager"):
        model, _ = attached(unmask)
        model.set_attn_implementation(impl)
        torch.testing.assert_close(hidden(model, batch)[real], hidden(model, other)[real], rtol=0, atol=1e-6)
    model, _ = attached(unmask)
    model.to(torch.bfloat16)
    with training_attention(model, torch.device("cpu")) as switched:
        assert switched
        torch.testing.assert_close(hidden(model, batch)[real], hidden(model, other)[real], rtol=0, atol=0)


def test_lmadapt_cpu_attention_honours_unmasked_layers():
    """bf16 on CPU takes lmadapt's matmul attention: it must agree with sdpa with and without padding (no padding:
    transformers passes no mask, and the layer says is_causal=False)."""
    for batch in (padded_batch("right"), {"input_ids": padded_batch()["input_ids"][:1]}):
        model, _ = attached("all")
        model.to(torch.bfloat16)
        want = hidden(model, batch).float()
        with training_attention(model, torch.device("cpu")):
            got = hidden(model, batch).float()
        real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        torch.testing.assert_close(got[real], want[real], rtol=0.05, atol=0.05)
        causal = tiny_llama().to(torch.bfloat16)
        assert float((got[real] - hidden(causal, batch).float()[real]).abs().max()) > 0.1


def test_layer_choice():
    assert resolve_layers("none", 0, 4) == [] and resolve_layers("all", 0, 4) == [0, 1, 2, 3]
    assert resolve_layers([0, -1], 0, 4) == [0, 3] and resolve_layers("none", 2, 4) == [2, 3]
    assert resolve_layers([0], 2, 4) == [0, 2, 3]
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        resolve_layers([4], 0, 4)
    model = tiny_llama()
    assert unmask_layers(model, [1]) == [1] and unmask_layers(model, [0]) == [0]  # replaces, does not add
    assert len(model.model.layers[1].self_attn._forward_pre_hooks) == 0


# --- pooling and losses ----------------------------------------------------------------------------------------

def test_last_token_index_right_and_left_padding():
    right, left = padded_batch("right")["attention_mask"], padded_batch("left")["attention_mask"]
    assert last_token_index(right).tolist() == [8, 5, 3]  # the position before the first pad; L-1 without pads
    assert last_token_index(left).tolist() == [8, 8, 8]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_pooling_by_hand_ignores_pads(padding):
    mask = padded_batch(padding)["attention_mask"]
    h = torch.randn(3, 9, 8)
    head = torch.nn.Linear(8, 3, bias=False)
    noisy = h.masked_fill((mask == 0).unsqueeze(-1), 1e4)  # what pads hold must not matter
    for b in range(3):
        real = h[b, mask[b].bool()]
        for pooling, want in (("mean", head(real.mean(0))), ("last", head(real[-1])), ("max", head(real).amax(0))):
            got = pooled_logits(head, noisy, mask, pooling)[b]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=pooling)


def test_mean_pooling_of_hidden_states_equals_mean_of_per_token_logits():
    """LS-unLLaMA pools per-position logits; for the linear bias-free head that equals pooling hidden states."""
    mask = padded_batch("right")["attention_mask"]
    h, head = torch.randn(3, 9, 8), torch.nn.Linear(8, 3, bias=False)
    per_token = head(h)
    want = (per_token * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled_logits(head, h, mask, "mean"), want, rtol=1e-5, atol=1e-6)


def test_losses_against_their_formulas():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    y = torch.tensor([0, 1])
    loss, m = classification_loss(z, y, "single_label")
    lse = [math.log(sum(math.exp(v) for v in row)) for row in z.tolist()]
    assert float(loss) == pytest.approx((lse[0] - 2.0) + (lse[1] - 0.2), rel=1e-6)
    assert float(m["accuracy"]) == 1.0  # row 0 right, row 1 (argmax 2) wrong
    labels = torch.tensor([[0, 2], [1, -100]])
    assert multi_hot(labels, 3).tolist() == [[1, 0, 1], [0, 1, 0]]
    loss, _ = classification_loss(z, labels, "multi_label")

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))
    want = sum(bce(x, t) for row, trow in zip(z.tolist(), [[1, 0, 1], [0, 1, 0]]) for x, t in zip(row, trow)) / 3
    assert float(loss) == pytest.approx(want, rel=1e-6)
    loss, m = classification_loss(torch.tensor([[1.5], [-0.5]]), torch.tensor([1.0, 0.5]), "regression")
    assert float(loss) == pytest.approx(0.5 ** 2 + 1.0 ** 2) and float(m["abs_error"]) == pytest.approx(1.5)


def test_objective_loss_is_the_formula_on_the_models_pooled_state():
    model, objective = attached("all", pooling="mean")
    batch = {**padded_batch("right"), "labels": torch.tensor([0, 2, 1]), "sequence_labels": True}
    out = objective.loss(model, batch)
    h = hidden(model, {k: batch[k] for k in ("input_ids", "attention_mask")})
    m = batch["attention_mask"][..., None].float()
    z = ((h * m).sum(1) / m.sum(1)) @ model.score.weight.T
    assert out.count == 3
    torch.testing.assert_close(out.loss, F.cross_entropy(z, batch["labels"], reduction="sum"))
    with pytest.raises(LmadaptError, match="data.format: classification"):
        objective.count({**batch, "sequence_labels": False})
    with pytest.raises(LmadaptError, match="class index 3"):
        objective.loss(model, {**batch, "labels": torch.tensor([0, 3, 1])})


def test_config_problems_are_reported():
    with pytest.raises(ConfigError) as exc:
        build_objective({"name": "classify", "labels": ["a"], "unmask_last": -1, "head_lr_ratio": 0})
    text = str(exc.value)
    assert "at least 2 classes" in text and "unmask_last" in text and "head_lr_ratio" in text
    with pytest.raises(ConfigError, match="'avg' is not one of 'last', 'mean', 'max'"):
        build_objective({"name": "classify", "labels": NAMES, "pooling": "avg"})
    with pytest.raises(ConfigError, match="regression has one output"):
        build_objective({"name": "classify", "problem": "regression", "num_labels": 3})


# --- saving and loading ----------------------------------------------------------------------------------------

def test_head_and_unmasking_are_saved_with_the_adapter_and_come_back(tmp_path):
    torch.manual_seed(3)
    model, objective = attached([-1], pooling="last")
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                           "init": "random"})
    method.apply(model)
    batch = padded_batch("right")
    want = predict(model, objective, batch)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, objective=objective)
    assert list(read_objective_tensors(tmp_path / "a")) == ["score.weight"]
    fresh = tiny_llama()
    loaded = load_adapter_contents(fresh, tmp_path / "a")
    assert loaded.objective.name == "classify" and unmasked_layers(fresh) == [1]
    assert loaded.objective.config.labels == NAMES
    torch.testing.assert_close(loaded.objective.logits(fresh, batch), want, rtol=0, atol=0)
    with adapters_disabled(fresh):  # the LoRA factors (random B) came back too: without them the outputs differ
            assert float((predict(fresh, loaded.objective, batch) - want).abs().max()) > 1e-3


def test_the_peft_sequence_classification_form_loads_in_peft_with_the_same_outputs(tmp_path):
    """PEFT's modules_to_save form (export_peft_classifier) in transformers' LlamaForSequenceClassification + PEFT
    gives the logits lmadapt computes (pooling last, causal), on a right-padded batch (pad id 259 = config's)."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(4)
    model, objective = attached("none", pooling="last")
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                           "init": "random"})
    method.apply(model)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, objective=objective)
    export_peft_classifier(tmp_path / "a", tmp_path / "peft")
    base = tiny_llama()
    seq = LlamaForSequenceClassification(LlamaConfig(**{**base.config.to_dict(), "num_labels": 3}))
    seq.model.load_state_dict(base.model.state_dict())
    peft_model = PeftModel.from_pretrained(seq, str(tmp_path / "peft")).eval()
    batch = padded_batch("right")
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    torch.testing.assert_close(theirs, predict(model, objective, batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(LmadaptError, match="only pooling: last without unmasking"):
        m2, o2 = attached([-1])
        method.apply(m2)
        save_adapter(m2, method, tmp_path / "b", base_model="tiny", base_fingerprint=None, objective=o2)
        export_peft_classifier(tmp_path / "b", tmp_path / "peft2")


# --- data --------------------------------------------------------------------------------------------------------

def test_classification_rows_become_per_sequence_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"text": "a b", "label": "tech"}, {"text": "c", "label": 0}, {"text": "dd", "label": " sport"}])
    cfg = DataConfig(train=[str(path)], format="classification", labels=NAMES)
    data, _, report = load_splits(cfg, tiny_tokenizer())
    assert data.targets == [2, 0, 1] and report.train_examples == 3
    batch = Batcher(data, batch_size=3, max_length=64, packing=False, group_by_length=False, pad_id=259,
                    seed=0).collate([0, 1, 2])
    assert batch["labels"].tolist() == [2, 0, 1] and batch["sequence_labels"]
    write_jsonl(path, [{"text": "a", "label": ["tech", 0]}, {"text": "b", "label": 2.5}])
    data, _, _ = load_splits(cfg, tiny_tokenizer())
    multi = Batcher(data, batch_size=1, max_length=64, packing=False, group_by_length=False, pad_id=259,
                    seed=0).collate([0])
    assert multi["labels"].tolist() == [[2, 0]]
    assert data.targets[1] == 2.5


def test_bad_classification_rows_are_named_by_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": "ok", "label": "sport"}, {"text": "x", "label": "sports"}, {"text": "y"},
                       {"text": "z", "label": 7}, {"text": "", "label": True}])
    with pytest.raises(DataError) as exc:
        load_splits(DataConfig(train=[str(path)], format="classification", labels=NAMES), tiny_tokenizer())
    text = str(exc.value)
    assert f"{path}:2: field 'label': unknown label 'sports'; the labels are {NAMES}" in text
    assert f"{path}:3: field 'label' is missing" in text
    assert f"{path}:4: field 'label': class index 7 is out of range" in text
    assert f"{path}:5: field 'text' is empty" in text and "got bool" in text
    assert DataConfig(format="classification", batching="packed").check()[0].startswith("batching: packed")


# --- training through the loop -----------------------------------------------------------------------------------

def topic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = NAMES[i % 3]
        rows.append({"text": " ".join(rng.choice(TOPICS[topic]) for _ in range(rng.randint(2, 6))), "label": topic})
    return rows


def run_config(tmp_path, tiny_model_dir, name="run", method=None, **train_fields) -> dict:
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train_file, topic_rows(48, 0))
    write_jsonl(test_file, topic_rows(30, 1))
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [str(train_file)], "format": "classification", "labels": NAMES, "max_length": 64},
        "method": method or {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["all-linear"]},
        "objective": {"name": "classify", "labels": NAMES, "unmask_last": 1},
        "train": {"lr": 5e-3, "batch_size": 8, "max_steps": 40, "tensorboard": False, "schedule": "constant",
                  "threads": 1, **train_fields},
        "evals": [{"task": "head_classification", "data": [str(test_file)]}],
        "output_dir": str(tmp_path / name),
    }


def test_a_few_lora_steps_learn_a_separable_task(tmp_path, tiny_model_dir):
    result = train(run_config(tmp_path, tiny_model_dir), progress=False)
    before, after = result.evals_before[0], result.evals_after[0]
    assert before["accuracy"] is None and "no sequence classification head" in before["note"]  # the base model has no head
    assert after["accuracy"] >= 0.9 and after["macro_f1"] >= 0.9  # chance: 1/3
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["classify/accuracy"] for r in records if "classify/accuracy" in r]
    assert len(accuracy) == 40 and sum(accuracy[:4]) / 4 < 0.6 and sum(accuracy[-4:]) / 4 > 0.9
    # the saved adapter reproduces the evaluation: head, LoRA and the unmasked last layer come back
    model, tok = tiny_llama(), tiny_tokenizer()
    loaded = load_adapter_contents(model, result.adapter_dir)
    rows = topic_rows(30, 1)
    logits = head_logits(model, tok, [r["text"] for r in rows])
    assert unmasked_layers(model) == [1] and loaded.objective.config.unmask_last == 1
    assert sum(NAMES[int(i)] == r["label"] for i, r in zip(logits.argmax(-1), rows)) == after["correct"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_in_fp32_and_bf16_run_through_the_loop(tmp_path, tiny_model_dir, method, precision):
    spec = {"name": "full"} if method == "full" else None
    result = train(run_config(tmp_path, tiny_model_dir, method=spec, max_steps=3, precision=precision),
                   progress=False)
    assert result.report["steps"] == 3 and math.isfinite(result.report["final_train_loss"])
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert [k for k in saved if "score" in k] == ["lmadapt_objective.score.weight"]  # once, as the objective's
    assert saved["lmadapt_objective.score.weight"].dtype == torch.float32


def test_a_run_resumes_exactly(tmp_path, tiny_model_dir):
    def cfg(name):
        return {**run_config(tmp_path, tiny_model_dir, name, max_steps=6, save_every=2), "evals": []}
    whole = train(cfg("whole"), progress=False)
    with killed_at(5), pytest.raises(KeyboardInterrupt):
        train(cfg("cut"), progress=False)
    resumed = train(cfg("cut"), resume=True, progress=False)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert "lmadapt_objective.score.weight" in a
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_macro_f1_by_hand():
    f1 = f1_scores([0, 0, 1, 2], [0, 1, 1, 1], [0, 1, 2])
    assert f1 == {0: pytest.approx(2 / 3), 1: pytest.approx(2 / 4), 2: 0.0}


# --- multi-label evaluation ---------------------------------------------------------------------------------------

# Five rows over labels a, b, c, d: gold sets, and the head's planted logits (+2: predicted, -2 or 0: not; 0 is
# sigmoid 0.5 exactly, which is not above the threshold). d is never present nor predicted.
ML_NAMES = ["a", "b", "c", "d"]
ML_GOLD = [["a", "b"], ["b"], ["c"], ["a", "c"], []]
ML_LOGITS = torch.tensor([[2.0, -2.0, -2.0, -2.0],   # predicts {a}
                          [-2.0, 2.0, 2.0, -2.0],    # {b, c}
                          [-2.0, -2.0, 2.0, 0.0],    # {c}: d sits at sigmoid 0.5
                          [2.0, -2.0, 2.0, -2.0],    # {a, c}
                          [-2.0, 2.0, 0.0, -2.0]])   # {b}


def test_multi_label_metrics_by_hand():
    """As scikit-learn's accuracy_score / f1_score(average=micro, macro, None, zero_division=0) on indicator
    matrices, worked out by hand: per label (TP, FP, FN) a (2, 0, 0), b (1, 1, 1), c (2, 1, 0), d (0, 0, 0)."""
    from lmadapt.evaluation.tasks.head_classification import multi_label_metrics

    index = {name: k for k, name in enumerate(ML_NAMES)}
    gold = [{index[n] for n in row} for row in ML_GOLD]
    predicted = [set((row > 0).nonzero().flatten().tolist()) for row in ML_LOGITS]
    assert predicted == [{0}, {1, 2}, {2}, {0, 2}, {1}]
    out = multi_label_metrics(gold, predicted, 4)
    assert out["per_label_f1"] == {0: 1.0, 1: pytest.approx(2 / 4), 2: pytest.approx(4 / 5), 3: 0.0}
    assert out["macro_f1"] == pytest.approx((1 + 0.5 + 0.8 + 0) / 4)
    assert out["micro_f1"] == pytest.approx(2 * 5 / (2 * 5 + 2 + 1))  # ΣTP 5, ΣFP 2, ΣFN 1
    assert out["subset_accuracy"] == pytest.approx(2 / 5) and out["correct"] == 2  # rows 3 and 4 exactly right


def multi_label_model() -> torch.nn.Module:
    model = tiny_llama()
    build_objective({"name": "classify", "problem": "multi_label", "labels": ML_NAMES}).setup(
        model, None, torch.device("cpu"))
    return model


def test_head_classification_reports_multi_label_metrics_of_the_planted_head(tmp_path, monkeypatch):
    from lmadapt.evaluation import EvalConfig, evaluate
    from lmadapt.evaluation.tasks import head_classification

    path = tmp_path / "ml.jsonl"
    write_jsonl(path, [{"text": f"row {i}", "label": gold} for i, gold in enumerate(ML_GOLD)])
    monkeypatch.setattr(head_classification, "head_logits", lambda *a, **k: ML_LOGITS.clone())
    out = evaluate(multi_label_model(), tiny_tokenizer(), EvalConfig(task="head_classification", data=[str(path)]),
                   progress=False, predictions=tmp_path / "preds.jsonl")
    assert out["subset_accuracy"] == pytest.approx(0.4) and out["correct"] == 2 and out["n"] == 5
    assert out["micro_f1"] == pytest.approx(10 / 13) and out["macro_f1"] == pytest.approx(0.575)
    assert out["per_label_f1"] == {"a": 1.0, "b": pytest.approx(0.5), "c": pytest.approx(0.8), "d": 0.0}
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == [["a"], ["b", "c"], ["c"], ["a", "c"], ["b"]]
    assert [p["gold"] for p in preds] == [["a", "b"], ["b"], ["c"], ["a", "c"], []]
    assert [p["correct"] for p in preds] == [False, False, True, True, False]
    assert preds[2]["score"]["d"] == 0.5 and preds[0]["score"]["a"] == pytest.approx(1 / (1 + math.exp(-2)))


def test_multi_label_evaluation_of_a_real_head_matches_its_thresholded_logits(tmp_path):
    """No planting: the task's figures equal multi_label_metrics of the head's own logits at z > 0, and labels
    given by index or as a single name count as the same sets."""
    from lmadapt.evaluation import EvalConfig, evaluate
    from lmadapt.evaluation.tasks.head_classification import multi_label_metrics

    model, tok = multi_label_model(), tiny_tokenizer()
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(0)))
    rows = topic_rows(12, 3)
    labels = [[0, "c"], "b", [], [3], ["a", "b", "c", "d"], [1, 2]] * 2
    path = tmp_path / "ml.jsonl"
    write_jsonl(path, [{"text": r["text"], "label": lab} for r, lab in zip(rows, labels)])
    out = evaluate(model, tok, EvalConfig(task="head_classification", data=[str(path)]), progress=False)
    logits = head_logits(model, tok, [r["text"] for r in rows])
    gold = [{ML_NAMES.index(x) if isinstance(x, str) else x for x in (lab if isinstance(lab, list) else [lab])}
            for lab in labels]
    expected = multi_label_metrics(gold, [set((z > 0).nonzero().flatten().tolist()) for z in logits], 4)
    assert {k: out[k] for k in ("subset_accuracy", "micro_f1", "macro_f1", "correct")} == \
        {k: pytest.approx(expected[k]) for k in ("subset_accuracy", "micro_f1", "macro_f1", "correct")}
    assert 0 < out["micro_f1"] < 1  # a random head gets some labels right and some wrong


def test_bad_multi_label_rows_are_named(tmp_path):
    from lmadapt.evaluation import EvalConfig, evaluate

    path = tmp_path / "ml.jsonl"
    write_jsonl(path, [{"text": "x", "label": ["a", "zz"]}, {"text": "y", "label": [7]}])
    with pytest.raises(DataError) as exc:
        evaluate(multi_label_model(), tiny_tokenizer(), EvalConfig(task="head_classification", data=[str(path)]),
                 progress=False)
    text = str(exc.value)
    assert "example 0: field 'label': 'zz' is not one of ['a', 'b', 'c', 'd'] (or a list of them" in text
    assert "example 1: field 'label': 7 is not one of" in text
