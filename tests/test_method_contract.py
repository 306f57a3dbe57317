"""The method contract, driven through the real loop: every hook is called, in order, with the right step numbers
and micro-batches; a method's own state survives a resume, also after it changed its trainable set."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from lmadapt.config import option
from lmadapt.errors import ConfigError
from lmadapt.methods.base import ParamGroup
from lmadapt.methods.lora import Lora, LoraConfig, LoraLinear
from lmadapt.methods.registry import METHODS
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import load_run_config, train

pytestmark = pytest.mark.usefixtures("one_thread")

CALLS: list[tuple] = []
KILL_AT: dict[str, int | None] = {"step": None}


class Killed(RuntimeError):
    """Stands in for a kill of the process in the middle of a run."""


@dataclass
class ProbeConfig(LoraConfig):
    switch_at: int = option(2, "Optimizer steps trained with lora_B alone; then lora_A trains too.")
    calibration_batches: int = option(0, "Batches handed to calibrate().")


class Probe(Lora):
    """LoRA that records every hook and trains lora_B alone until ``switch_at`` steps, then A and B (a structural
    change that rebuilds the optimizer); its stage is state that checkpoints must carry."""

    name = "probe"
    config_class = ProbeConfig

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__(config)
        self.stage = 0

    def calibrate(self, model, batches):
        CALLS.append(("calibrate", len(batches), [b["input_ids"].shape for b in batches]))

    def apply(self, model):
        super().apply(model)
        self._set_trainable(model)

    def _set_trainable(self, model):
        for _, m in modules_of_type(model, LoraLinear):
            m.lora_A.requires_grad_(self.stage == 1)

    def parameter_groups(self, model):
        layers = [m for _, m in modules_of_type(model, LoraLinear)]
        params = [m.lora_B for m in layers] + ([m.lora_A for m in layers] if self.stage == 1 else [])
        return [ParamGroup("probe", params)]

    def extra_loss(self, ctx):
        base = ctx.base_logits()
        with torch.no_grad(), adapters_disabled(ctx.model):
            again = ctx.model(input_ids=ctx.batch["input_ids"], use_cache=False).logits
        positions = getattr(ctx.outputs, "logit_positions", None)
        again = again if positions is None else again[:, positions]
        CALLS.append(("extra_loss", ctx.step, ctx.micro_index, ctx.batch["input_ids"].clone(),
                      float((base - again).abs().max())))
        return None

    def before_optimizer_step(self, ctx):
        grads_ok = all(p.grad is not None for g in ctx.optimizer.param_groups for p in g["params"])
        CALLS.append(("before", ctx.step, [c.batch["input_ids"].clone() for c in ctx.micro_batches], grads_ok))

    def after_optimizer_step(self, ctx):
        CALLS.append(("after", ctx.step, len(ctx.micro_batches)))

    def on_step_end(self, ctx):
        CALLS.append(("end", ctx.step, self.stage))
        if KILL_AT["step"] is not None and ctx.step + 1 == KILL_AT["step"]:
            raise Killed(f"killed after step {ctx.step + 1}")
        if self.stage == 0 and ctx.step + 1 == self.config.switch_at:
            self.stage = 1
            self._set_trainable(ctx.model)
            return True
        return False

    def state_dict(self):
        return {"stage": self.stage}

    def load_state_dict(self, model, state):
        CALLS.append(("load_state", dict(state)))
        self.stage = state["stage"]
        self._set_trainable(model)


@pytest.fixture(autouse=True)
def _clean():
    """The probe is registered only while a test of this file (or a process it starts) runs, so the contract
    tables of test_methods.py never see it."""
    CALLS.clear()
    KILL_AT["step"] = None
    METHODS.register(Probe)
    yield
    METHODS.unregister(Probe.name)
    KILL_AT["step"] = None


def _config(run_config, **method):
    run_config["method"] = {"name": "probe", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **method}
    run_config["train"].update({"grad_accum": 2, "batch_size": 4, "max_steps": 4})
    return run_config


def test_every_hook_runs_in_order_with_each_micro_batch(run_config):
    cfg = _config(run_config, calibration_batches=3)
    train(cfg, progress=False)
    assert CALLS[0][0] == "calibrate" and CALLS[0][1] == 3  # once, before training, with the batches asked for
    names = [c[0] for c in CALLS[1:]]
    assert names == ["extra_loss", "extra_loss", "before", "after", "end"] * 4
    steps = [c[1] for c in CALLS[1:]]
    assert steps == [s for s in range(4) for _ in range(5)]
    # extra_loss sees micro-batches 0 and 1; the step hooks see both batches, the same ones, in order
    for s in range(4):
        e0, e1, before, after, end = CALLS[1 + 5 * s: 6 + 5 * s]
        assert (e0[2], e1[2]) == (0, 1)
        assert len(before[2]) == 2 and torch.equal(before[2][0], e0[3]) and torch.equal(before[2][1], e1[3])
        assert before[3] and after[2] == 2
        assert not torch.equal(e0[3], e1[3]) if e0[3].shape == e1[3].shape else True
    # base_logits() is the model with its adapters switched off, at the objective's positions
    assert max(c[4] for c in CALLS if c[0] == "extra_loss") < 1e-5
    # the switch after step 2 rebuilt the optimizer: lora_A trained from then on
    assert [c[2] for c in CALLS if c[0] == "end"] == [0, 0, 1, 1]


def test_resume_after_a_trainable_set_change_is_bit_exact(run_config, tmp_path):
    cfg = _config(run_config)
    cfg["train"].update({"max_steps": 6, "save_every": 3})
    reference = train({**cfg, "output_dir": str(tmp_path / "whole")}, progress=False)
    killed = {**cfg, "output_dir": str(tmp_path / "killed")}
    KILL_AT["step"] = 5  # after the switch (step 2) and after the checkpoint at step 3
    with pytest.raises(Killed):
        train(killed, progress=False)
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-0000003"]
    KILL_AT["step"] = None
    CALLS.clear()
    resumed = train(killed, resume=True, progress=False)
    assert ("load_state", {"stage": 1}) in CALLS  # the method's own state came back before the optimizer
    a = load_file(str(reference.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)


def test_objective_section_is_validated_like_the_method(run_config):
    run_config["objective"] = {"name": "distil"}
    with pytest.raises(ConfigError, match=r"objective.name: unknown objective 'distil'.*distill"):
        load_run_config(run_config)
    run_config["objective"] = {"name": "distill", "temperature": 0}
    with pytest.raises(ConfigError, match=r"objective.temperature: must be > 0"):
        load_run_config(run_config)


def _kl_to_base(model_dir, adapter_dir, tokenizer) -> float:
    """Mean KL(base || adapted) of the next-token distributions over a few topic prompts."""
    from conftest import make_rows

    import lmadapt

    model, tok, _ = lmadapt.load(str(model_dir), adapter=adapter_dir)
    rows = [r["prompt"] + r["completion"] for r in make_rows(8, seed=5)]
    ids = [tok(r)["input_ids"] for r in rows]
    n = min(map(len, ids))
    batch = torch.tensor([i[:n] for i in ids])
    with torch.no_grad():
        adapted = model(input_ids=batch).logits.log_softmax(-1)
        with adapters_disabled(model):
            base = model(input_ids=batch).logits.log_softmax(-1)
    return float((base.exp() * (base - adapted)).sum(-1).mean())


def test_self_distillation_from_the_base_stays_closer_to_it(run_config, tmp_path, tiny_model_dir, tokenizer):
    """objective distill with teacher=base (the adapters-off model, no second copy): KL = 0 at init, and the
    adapted model ends closer to its base than after plain SFT with the same data and steps."""
    run_config["method"] = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    run_config["train"].update({"max_steps": 6, "lr": 2e-2})
    sft = train({**run_config, "output_dir": str(tmp_path / "sft")}, progress=False)
    kd = train({**run_config, "objective": {"name": "distill", "teacher": "base", "lm_weight": 1.0, "distill_weight": 20.0},
                "output_dir": str(tmp_path / "kd")}, progress=False)
    assert kd.report["objective"] == "distill" and sft.report["objective"] == "causal_lm"
    assert kd.loop.history[0]["loss"] == pytest.approx(sft.loop.history[0]["loss"], rel=1e-5)  # KL 0 at init
    kl = {name: _kl_to_base(tiny_model_dir, r.adapter_dir, tokenizer) for name, r in (("sft", sft), ("kd", kd))}
    assert kl["sft"] > 1e-3 and kl["kd"] < 0.5 * kl["sft"]


def test_padding_mask_is_kept_when_the_method_attends_both_ways(run_config, tmp_path):
    """Dropping a right-padding mask is exact only under causal attention everywhere; a method that removes the
    causal mask (e.g. for classification heads) keeps it."""
    from lmadapt.data import load_splits
    from lmadapt.models.loading import load_model
    from lmadapt.objectives.base import build_objective
    from lmadapt.recipes.finetune import run_batcher
    from lmadapt.training.loop import Trainer

    class Bidirectional(Lora):
        causal_attention = False

    cfg = load_run_config(run_config)
    model, tok = load_model(cfg.model)
    train_set, _, _ = load_splits(cfg.data, tok)
    seen = []
    objective = build_objective("causal_lm")
    real = objective.loss

    def spy(model, batch, *, drop_padding_mask=False):
        seen.append(drop_padding_mask)
        return real(model, batch, drop_padding_mask=drop_padding_mask)
    objective.loss = spy
    for cls, expected in ((Lora, True), (Bidirectional, False)):
        method = cls(LoraConfig(r=2, target_modules=["q_proj"]))
        method.apply(model) if cls is Lora else None
        trainer = Trainer(model, method, cfg.train, run_batcher(train_set, cfg, tok), None, tmp_path,
                          base_model="tiny", base_fingerprint=None, device=torch.device("cpu"), objective=objective)
        assert trainer.drop_padding_mask is expected
        seen.clear()
        trainer._step()
        assert seen and all(s is expected for s in seen)
