"""The ``preference`` evaluation task: its metrics against hand formulas on set log-probabilities, its log-probabilities
and rewards against objective ``dpo`` on a training batch (plain, implicit-prompt and TRL's conversational pairs),
null rewards with a note for a model without adapters, bad rows named by file, line and field, and a DPO run whose
``evals:`` holds the task reporting it before and after (reward accuracy 1 after training on toy pairs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

import lmadapt
from lmadapt.config import ConfigError, from_dict
from lmadapt.data import Batcher, DataConfig, load_splits
from lmadapt.errors import DataError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.predictions import read_predictions
from lmadapt.evaluation.report import compare_table
from lmadapt.evaluation.run import evaluate
from lmadapt.evaluation.tasks.preference import (
    NO_REFERENCE,
    pair_scores,
    preference_accuracy,
    preference_metrics,
)
from lmadapt.methods import build_method
from lmadapt.models.tree import adapters_disabled
from lmadapt.objectives.base import build_objective
from lmadapt.objectives.preference import dpo_losses, response_logps
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
LOG2 = math.log(2)


def pair_rows(indices: range, chosen: str = " yes", rejected: str = " no") -> list[dict]:
    return [{"prompt": f"Question {i}: is it fine?", "chosen": chosen, "rejected": rejected} for i in indices]


USER = {"role": "user", "content": "Can you help me?"}
MIXED = [  # TRL's forms: strings with a prompt, strings with an implicit prompt, conversations (given and implicit)
    {"prompt": "Question 1: is it fine?", "chosen": " yes, it is", "rejected": " no"},
    {"chosen": "Is the sky green? No, it is blue.", "rejected": "Is the sky green? Yes."},
    {"prompt": [USER, {"role": "assistant", "content": "Gladly."}, {"role": "user", "content": "Name a colour."}],
     "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Seven."}]},
    {"chosen": [USER, {"role": "assistant", "content": "Of course."}],
     "rejected": [USER, {"role": "assistant", "content": "Go away."}]},
]


def lora(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``model`` with a LoRA whose B is random: the adapter changes every output."""
    build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}).apply(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def training_logps(model: torch.nn.Module, path: Path, **data) -> tuple[torch.Tensor, ...]:
    """(policy chosen, policy rejected, reference chosen, reference rejected, response tokens chosen, rejected): what
    objective dpo computes for the pairs of ``path`` collated as one training batch, in file order."""
    tok = tiny_tokenizer()
    train_set, _, _ = load_splits(DataConfig(train=[str(path)], **data), tok)
    batcher = Batcher(train_set, batch_size=64, max_length=1024, packing=False, group_by_length=False,
                      pad_id=tok.pad_token_id, seed=0)
    n = len(train_set.input_ids) // 2
    batch = batcher.collate([[2 * k, 2 * k + 1] for k in range(n)])
    model.eval()
    with torch.no_grad():
        logps, counts, _ = response_logps(model, batch)
        with adapters_disabled(model):
            ref = response_logps(model, batch)[0]
    return logps[:n], logps[n:], ref[:n], ref[n:], counts[:n], counts[n:]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------------ the metrics

SCORES = [  # (logp chosen, logp rejected, tokens chosen, tokens rejected, ref chosen, ref rejected)
    (-4.0, -6.0, 2, 2, -5.0, -5.5),  # preferred; reward margin β·(1 - (-0.5)) = 1.5β
    (-9.0, -3.0, 6, 1, -8.0, -4.0),  # not preferred, but per token -1.5 > -3: preferred length-normalised; -2β
    (-2.0, -2.0, 1, 1, -1.0, -3.0),  # a tie, which neither accuracy counts; reward margin β·(-1 - 1) = -2β
]


def as_scores(rows: list[tuple]) -> list[dict]:
    keys = ("logp_chosen", "logp_rejected", "tokens_chosen", "tokens_rejected", "ref_logp_chosen", "ref_logp_rejected")
    return [dict(zip(keys, row)) for row in rows]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_the_metrics_are_the_hand_formulas_on_set_log_probabilities(beta):
    metrics, preds = preference_metrics(as_scores(SCORES), beta=beta)
    margins = [beta * ((c - rc) - (r - rr)) for c, r, _, _, rc, rr in SCORES]
    assert metrics["preference_accuracy"] == pytest.approx(1 / 3)
    assert metrics["logp_margin"] == pytest.approx((2 - 6 + 0) / 3)
    assert metrics["length_normalised_accuracy"] == pytest.approx(2 / 3)  # -2 > -3 and -1.5 > -3; the tie is not
    assert margins == pytest.approx([1.5 * beta, -2 * beta, -2 * beta])
    assert metrics["reward_accuracy"] == pytest.approx(1 / 3)
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / 3)
    assert metrics["dpo_loss"] == pytest.approx(sum(-log_sigmoid(m) for m in margins) / 3, rel=1e-12)
    assert metrics["n"] == 3 and "note" not in metrics
    assert [p["prediction"] for p in preds] == ["chosen", "rejected", "tie"]
    assert [p["correct"] for p in preds] == [True, False, False]
    assert [p["score"] for p in preds] == [2.0, -6.0, 0.0]
    assert [p["reward_margin"] for p in preds] == pytest.approx(margins)
    assert preds[0]["ref_logp_rejected"] == -5.5 and preds[1]["tokens_chosen"] == 6 and preds[0]["gold"] == "chosen"


def test_without_a_reference_the_reward_metrics_are_null_with_a_note_and_dropped_pairs_are_named():
    rows = [(c, r, nc, nr, None, None) for c, r, nc, nr, _, _ in SCORES]
    metrics, preds = preference_metrics([None, *as_scores(rows)])
    assert metrics["reward_accuracy"] is metrics["reward_margin"] is metrics["dpo_loss"] is None
    assert metrics["preference_accuracy"] == pytest.approx(1 / 3) and metrics["n"] == 3
    assert metrics["note"].startswith(NO_REFERENCE) and "1 pair(s) that max_length cuts" in metrics["note"]
    assert preds[0]["prediction"] is None and preds[0]["correct"] is None and len(preds) == 4
    assert all(p["reward_margin"] is None for p in preds)


# ------------------------------------------------------------------------------------------------ the scoring

def test_log_probs_and_rewards_equal_objective_dpo_on_a_training_batch_for_every_pair_form(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, MIXED)
    model = lora(tiny_llama())
    cfg = EvalConfig(task="preference", data=[str(path)], chat=True, beta=0.5)
    result = evaluate(model, tiny_tokenizer(), cfg, progress=False, predictions=tmp_path / "p.jsonl")
    preds = read_predictions(tmp_path / "p.jsonl")
    pc, pr, rc, rr, nc, nr = training_logps(model, path, use_chat_template=True)
    column = {key: torch.tensor([p[key] for p in preds], dtype=torch.float64) for key in preds[0]
              if key.startswith(("logp", "ref_logp", "tokens"))}
    for key, want in {"logp_chosen": pc, "logp_rejected": pr, "ref_logp_chosen": rc, "ref_logp_rejected": rr}.items():
        torch.testing.assert_close(column[key], want.double(), atol=1e-5, rtol=0)
    assert column["tokens_chosen"].tolist() == nc.tolist() and column["tokens_rejected"].tolist() == nr.tolist()
    assert nc[2] == len(tiny_tokenizer()("Blue.", add_special_tokens=False).input_ids) + 1  # the reply + end of turn
    _, chosen, rejected = dpo_losses(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(torch.tensor([p["reward_margin"] for p in preds], dtype=torch.float64),
                               (chosen - rejected).double(), atol=1e-5, rtol=0)
    assert result["n"] == 4 and result["reward_accuracy"] is not None and "note" not in result


def test_the_reference_is_the_model_without_its_adapter_and_a_plain_model_gets_no_rewards(tmp_path):
    rows = pair_rows(range(3)) + MIXED[:2]
    base = pair_scores(tiny_llama(), tiny_tokenizer(), rows, progress=False)
    tuned = pair_scores(lora(tiny_llama()), tiny_tokenizer(), rows, progress=False)
    for b, t in zip(base, tuned):
        assert b["ref_logp_chosen"] is None and b["ref_logp_rejected"] is None
        assert t["ref_logp_chosen"] == pytest.approx(b["logp_chosen"], abs=1e-5)
        assert t["ref_logp_rejected"] == pytest.approx(b["logp_rejected"], abs=1e-5)
        assert t["logp_chosen"] != pytest.approx(b["logp_chosen"], abs=1e-3)  # the adapter is on for the policy
    plain = preference_accuracy(tiny_llama(), tiny_tokenizer(), rows, progress=False)
    assert plain["reward_accuracy"] is None and plain["note"] == NO_REFERENCE
    assert plain["preference_accuracy"] == pytest.approx(sum(s["logp_chosen"] > s["logp_rejected"] for s in base) / 5)


def test_a_pair_cut_to_its_prompt_by_max_length_is_left_out_as_training_drops_it():
    rows = [{"prompt": "x" * 40, "chosen": " yes", "rejected": " no"}, *pair_rows(range(1))]
    scores = pair_scores(tiny_llama(), tiny_tokenizer(), rows, max_length=30, progress=False)
    assert scores[0] is None and scores[1]["tokens_chosen"] == len(" yes") + 1  # bytes + EOS
    metrics = preference_metrics(scores)[0]
    assert metrics["n"] == 1 and "1 pair(s) that max_length cuts" in metrics["note"]


# ------------------------------------------------------------------------------------------------ rows and settings

def test_bad_rows_are_named_by_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [
        {"prompt": "Q?", "good": " yes", "bad": " yes"},
        {"prompt": "Q?", "good": " yes"},
        {"prompt": 3, "good": "", "bad": " no"},
        {"prompt": [USER], "good": [{"role": "bot", "content": "x"}], "bad": [{"role": "assistant", "content": ""}]},
        {"good": "Same start, longer", "bad": "Same start"},
        {"prompt": "Q?", "good": " yes", "bad": " no"},
    ])
    cfg = EvalConfig(task="preference", data=[str(path)], chosen_field="good", rejected_field="bad")
    with pytest.raises(DataError) as exc:
        evaluate(tiny_llama(), tiny_tokenizer(), cfg, progress=False)
    assert exc.value.problems == [
        f"{path}:1: field 'bad': the same text as 'good', so the pair prefers nothing",
        f"{path}:2: field 'bad': missing",
        f"{path}:3: field 'prompt': expected a string, got int",
        f"{path}:3: field 'good': is empty",
        f"{path}:4: field 'good': [0].role: unknown role 'bot' (allowed: system, user, assistant, tool)",
        f"{path}:4: field 'bad': [0].content is empty",
        f"{path}:5: field 'bad': is empty",  # the implicit prompt is all of 'bad': nothing is left of it
    ]


def test_beta_must_be_positive_and_only_the_preference_task_reads_it():
    with pytest.raises(ConfigError, match=r"beta: must be > 0, got 0"):
        from_dict(EvalConfig, {"task": "preference", "data": ["p.jsonl"], "beta": 0})
    with pytest.raises(ConfigError, match="beta: task 'completion_loss' does not read this setting"):
        from_dict(EvalConfig, {"task": "completion_loss", "data": ["p.jsonl"], "beta": 0.2})


def test_lmadapt_eval_reports_the_task(tmp_path, tiny_model_dir, capsys):
    from lmadapt.cli import main

    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, pair_rows(range(3)))
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "preference", "--data", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "preference" and result["n"] == 3 and result["reward_accuracy"] is None
    direct = preference_accuracy(tiny_llama(), tiny_tokenizer(), pair_rows(range(3)), progress=False)
    assert result["note"] == direct["note"] == NO_REFERENCE
    assert result["logp_margin"] == pytest.approx(direct["logp_margin"], abs=1e-5)
    assert result["preference_accuracy"] == direct["preference_accuracy"]


# ------------------------------------------------------------------------------------------------ a DPO run

@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    """Eight LoRA steps of DPO on pairs that always prefer ' yes' to ' no', the task among the run's evals."""
    folder = tmp_path_factory.mktemp("dpo-eval")
    write_jsonl(folder / "train.jsonl", pair_rows(range(24)))
    write_jsonl(folder / "heldout.jsonl", pair_rows(range(100, 106)))
    return train({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [str(folder / "train.jsonl")], "max_length": 64, "validation_fraction": 0.0},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {"lr": 2e-2, "batch_size": 6, "max_steps": 8, "tensorboard": False, "schedule": "constant",
                  "threads": 1},
        "evals": [{"task": "preference", "data": [str(folder / "heldout.jsonl")]}],
        "output_dir": str(folder / "run"),
    }, progress=False), folder / "heldout.jsonl"


def test_a_dpo_run_reports_the_task_before_and_after(dpo_run):
    result, _ = dpo_run
    [entry] = result.report["evals"]
    before, after = entry["before"], entry["after"]
    assert before["reward_accuracy"] is None and before["note"] == NO_REFERENCE  # the base model has no adapter
    assert after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0 and after["dpo_loss"] < LOG2
    assert "note" not in after
    # ' yes' has one token more than ' no': DPO raised its log-probability relative to the base model (the reward),
    # and per token the model now prefers it, but 8 steps do not make its total likelier than ' no' (-5.9 -> -3.5)
    assert after["logp_margin"] > before["logp_margin"] + 1
    assert before["length_normalised_accuracy"] == 0 and after["length_normalised_accuracy"] == 1
    table = compare_table([("heldout", before, after)]).splitlines()
    assert any(line.split()[1:] == ["reward_accuracy", "-", "1.0000", "-"] for line in table)
    assert any(line.split()[1] == "preference_accuracy" for line in table)
    preds = read_predictions(result.run_dir / "predictions" / "0-preference-after.jsonl")
    assert len(preds) == 6 and all(p["reward_margin"] > 0 for p in preds)
    assert [p["correct"] for p in preds] == [p["logp_chosen"] > p["logp_rejected"] for p in preds]


def test_the_trained_adapters_rewards_equal_the_training_objectives(dpo_run, tiny_model_dir, tmp_path):
    result, heldout = dpo_run
    model, tok, _ = lmadapt.load(str(tiny_model_dir), result.adapter_dir)
    metrics = evaluate(model, tok, EvalConfig(task="preference", data=[str(heldout)]), progress=False,
                       predictions=tmp_path / "p.jsonl")
    preds = read_predictions(tmp_path / "p.jsonl")
    pc, pr, rc, rr, _, _ = training_logps(model, heldout)
    _, chosen, rejected = dpo_losses(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(torch.tensor([p["reward_margin"] for p in preds], dtype=torch.float64),
                               (chosen - rejected).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([p["logp_chosen"] for p in preds], dtype=torch.float64), pc.double(),
                               atol=1e-5, rtol=0)
    objective = build_objective({"name": "dpo", "beta": 0.1})  # the loss's own logged sums over the same batch
    tok_ = tiny_tokenizer()
    data, _, _ = load_splits(DataConfig(train=[str(heldout)]), tok_)
    batch = Batcher(data, batch_size=64, max_length=1024, packing=False, group_by_length=False,
                    pad_id=tok_.pad_token_id, seed=0).collate([[2 * k, 2 * k + 1] for k in range(6)])
    with torch.no_grad():
        logged = objective.loss(model, batch).metrics
    assert metrics["reward_margin"] == pytest.approx(logged["rewards/margin"] / 6, abs=1e-5)
    assert metrics["reward_accuracy"] == logged["rewards/accuracy"] / 6 == 1.0
