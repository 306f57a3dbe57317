"""MeteoRA: N existing LoRA adapters embedded as experts of every adapted linear layer, chosen per token by a gate.

"MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models", Xu et al., arXiv:2405.13053; released code
github.com/NJUDeepEngine/meteora (``MoELoRA/layer.py``, ``base_model/llama/modeling_llama_meteor.py``). For the
input x of a target linear (one gate per module, one decision per token)::

    g = W_g x                                       W_g: N x d_in, no bias, init N(0, gate_init_std^2), seeded
    fast:       (g_k, idx) = topk(g, k),  w = softmax(g_k / T)        (w = 1 when k = 1)
    reference:  p = softmax(g),  (w, idx) = topk(p, k),  w = w / sum(w)   (= fast at T = 1)
    y = W0 x + b + sum_{e in idx} w_e s_e B_e A_e dropout(x)          s_e = alpha_e / r_e (or / sqrt(r_e))

Each expert keeps its own rank, alpha and rsLoRA scale; an expert that does not adapt a module adds nothing there.
Only the gates train unless ``train_loras``. The gate loss (:meth:`Meteora.extra_loss`) is the paper's
cross-entropy of every gate's logits at position t toward the task id of token t+1 (all gates and layers
concatenated, ``task_loss_coef`` 50), or, without task ids, Switch Transformer's load-balancing term
(Fedus et al., arXiv:2101.03961, eq. 4-6). Every expert's ``A x`` is computed for every token and the unchosen
ones are weighted by 0 (exact, N times one LoRA's cost; the released kernels compute only the k chosen).

The adapter folder holds the gates and every expert's factors, and the config's ``layout`` (filled in by
:meth:`Meteora.apply`) records the experts' shapes, so it reloads without the expert folders. Not mergeable: the
update depends on x through the routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import AdapterError, LmadaptError
from lmadapt.methods.base import Method, ParamGroup, StepContext
from lmadapt.methods.lora import PEFT_PREFIX, load_tensors
from lmadapt.methods.meteora_layer import (
    MeteoraLinear,
    balance_loss,
    task_cross_entropy,
)
from lmadapt.methods.registry import build_method, register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    model_device,
    modules_of_type,
    name_matches,
    replace_module,
)

_LAYOUT_KEYS = {"name": str, "r": int, "alpha": (int, float), "rslora": bool, "modules": list}


@dataclass
class MeteoraConfig:
    experts: list[str] = option([], "The LoRA adapter folders (lmadapt's or PEFT's) to embed, in order: expert e is "
                                    "experts[e], the e a training row's task id names. Required unless layout is given.")
    expert_names: list[str] = option([], "A name per expert (gate_choices reports them). Empty: each folder's name "
                                         "(for a run's adapter/ folder, the run folder's).")
    top_k: int = option(2, "k: the experts each token uses in each module (the paper: 2).")
    weights: Literal["fast", "reference"] = option(
        "fast", "fast: topk of the gate logits, then softmax(g_k / temperature) (the released code's default path); "
                "reference: softmax, topk, renormalise (its plain path, which has no temperature).")
    temperature: float = option(1.0, "T of the fast path (the paper: 1 for single tasks; 15, 20, 30 for composites "
                                     "of 3, 5, 10 tasks).")
    gate_loss: Literal["task", "balance", "none"] = option(
        "task", "task: the paper's cross-entropy of every gate toward each token's task id (needs data.train_tasks); "
                "balance: Switch Transformer's load-balancing term (no task ids needed); none: the LM loss only.")
    task_loss_coef: float = option(50.0, "Weight of the task cross-entropy (the released moe_aux_loss_coef).")
    balance_loss_coef: float = option(0.01, "Weight of the load-balancing term (Switch Transformer's alpha).")
    train_loras: bool = option(False, "Also train the experts' A and B (the released script does); false: the "
                                      "gates only.")
    gate_init_std: float = option(1.0, "The gates start as N(0, std^2) (the code: nn.init.normal_).")
    gate_seed: int = option(0, "Seed of the gates' init (a generator of its own): a config reproduces its start.")
    dropout: float = option(0.0, "Dropout on the experts' input, training only (the released code fixes 0.1).")
    target_modules: list[str] = option([], "Linear layers that get a gate, named as for lora. Empty: every module "
                                           "some expert adapts.")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone.")
    layout: list[dict[str, Any]] = option(
        [], "Filled in when the experts are read: per expert its name, r, alpha, rslora and modules. A saved "
            "adapter records it, so loading needs no expert folder. Leave it empty.")

    def check(self) -> list[str]:
        n = len(self.layout) or len(self.experts)
        names = self.expert_names or [e.get("name") for e in self.layout]
        checks = [
            (not self.experts and not self.layout,
             "experts: give the LoRA adapter folders to embed, e.g. [runs/math/adapter, runs/code/adapter]"),
            (bool(self.experts and self.layout) and len(self.experts) != len(self.layout),
             f"layout: describes {len(self.layout)} experts but experts lists {len(self.experts)}"),
            (bool(self.expert_names) and len(self.expert_names) != n,
             f"expert_names: gives {len(self.expert_names)} name(s) for {n} experts; give one per expert"),
            (len(set(map(str, names))) != len(names), f"expert_names: each expert needs its own name, got {names}"),
            (self.top_k < 1 or (n > 0 and self.top_k > n),
             f"top_k: must be in [1, {max(n, 1)}] (the number of experts), got {self.top_k}"),
            (self.temperature <= 0, f"temperature: must be > 0, got {self.temperature}"),
            (self.weights == "reference" and self.temperature != 1.0,
             "temperature: only weights: fast uses it (the reference path is the released code's plain one)"),
            (self.task_loss_coef < 0 or self.balance_loss_coef < 0, "task_loss_coef, balance_loss_coef: must be >= 0"),
            (self.gate_init_std <= 0, f"gate_init_std: must be > 0, got {self.gate_init_std}"),
            (not 0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}"),
        ]
        return [text for bad, text in checks if bad] + _layout_problems(self.layout)


def _layout_problems(layout: list[dict[str, Any]]) -> list[str]:
    problems = []
    for i, entry in enumerate(layout):
        for key, kind in _LAYOUT_KEYS.items():
            value = entry.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool) or value in ("", []):
                problems.append(f"layout[{i}].{key}: missing or of the wrong type ({value!r}); save the adapter again")
    return problems


def expert_scale(entry: dict[str, Any]) -> float:
    """s_e = alpha / r, or alpha / sqrt(r) with rsLoRA, of one layout entry."""
    return entry["alpha"] / (entry["r"] ** 0.5 if entry["rslora"] else entry["r"])


def _expert_name(path: str) -> str:
    folder = Path(path).resolve()
    return folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name


def read_expert(path: str, where: str, modules: dict[str, nn.Module], base_fingerprint: str
                ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(layout entry without a name, module -> {"A", "B"}) of the LoRA adapter in ``path``, checked against the
    model (``modules``: its named modules): a plain LoRA of this base whose factors fit the modules they name."""
    from lmadapt.adapters.format import read_adapter_info, read_adapter_tensors

    try:
        info, tensors = read_adapter_info(path), read_adapter_tensors(path)
    except AdapterError as exc:
        raise AdapterError(f"{where}: {exc}") from None
    if info.method.get("name") != "lora":
        raise AdapterError(f"{where}: {path} holds a {info.method.get('name')!r} adapter; MeteoRA's experts are plain "
                           f"LoRA adapters (lora, a PEFT LoRA, or the adapter/ a pissa, olora or corda run exports)")
    if info.base_fingerprint and info.base_fingerprint != base_fingerprint:
        raise AdapterError(f"{where}: {path} was trained on base {info.base_model!r} (fingerprint "
                           f"{info.base_fingerprint}), not on this model (fingerprint {base_fingerprint}); embed "
                           f"experts trained on the same base")
    lora = build_method(info.method).config
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or part not in ("A.weight", "B.weight"):
            raise AdapterError(f"{where}: {path}: unexpected tensor {key}; a LoRA adapter holds "
                               f"{PEFT_PREFIX}<module>.lora_A.weight and .lora_B.weight only")
        factors.setdefault(module, {})[part[0]] = tensor
    for module, pair in factors.items():
        base = modules.get(module)
        want = None if not isinstance(base, nn.Linear) else {
            "A": (lora.r, base.in_features), "B": (base.out_features, lora.r)}
        got = {part: tuple(t.shape) for part, t in pair.items()}
        if want is None or got != want:
            raise AdapterError(f"{where}: {path}: module {module}: factors of shape {got} do not fit "
                               f"{'no linear layer of this model' if want is None else f'this model: want {want}'}")
    return {"r": lora.r, "alpha": lora.alpha, "rslora": lora.rslora}, factors


@register
class Meteora(Method):
    """MeteoRA (arXiv:2405.13053): y = W0 x + sum over the top-k experts of w_e s_e B_e A_e x, a gate per module."""

    name = "meteora"
    config_class = MeteoraConfig
    mergeable = False  # the update depends on x through the routing
    identity_at_init = False  # the experts are trained adapters

    def apply(self, model: nn.Module) -> None:
        """Read the experts (unless ``layout`` is given: then their factors come from a saved adapter), then put a
        :class:`MeteoraLinear` on every module some expert adapts (within ``target_modules``)."""
        cfg = self.config
        factors = None if cfg.layout else self._read_experts(model)
        freeze_all(model)
        names = cfg.expert_names or [e["name"] for e in cfg.layout]
        covered = [set(e["modules"]) for e in cfg.layout]
        scales = [expert_scale(e) for e in cfg.layout]
        generator = torch.Generator().manual_seed(cfg.gate_seed)
        for module, base in [(n, m) for n, m in model.named_modules() if any(n in c for c in covered)]:
            if not isinstance(base, nn.Linear):
                raise AdapterError(f"method.layout names module {module}, which is no linear layer of this model "
                                   f"(a {type(base).__name__}); load the adapter onto the base it was trained on")
            ranks = [e["r"] if module in c else 0 for e, c in zip(cfg.layout, covered)]
            gate = torch.randn(len(ranks), base.in_features, generator=generator) * cfg.gate_init_std
            layer = MeteoraLinear(base, ranks, scales, gate, names, top_k=cfg.top_k, weights=cfg.weights,
                                  temperature=cfg.temperature, dropout=cfg.dropout, train_loras=cfg.train_loras,
                                  keep_logits=cfg.gate_loss != "none")
            for e in range(len(ranks) if factors else 0):
                if (found := layer.factors(e)) is not None:
                    found[0].copy_(factors[e][module]["A"])
                    found[1].copy_(factors[e][module]["B"])
            replace_module(model, module, layer)
        self._filled = factors is not None  # False: zeros until load_adapter_state

    def _read_experts(self, model: nn.Module) -> list[dict[str, dict[str, torch.Tensor]]]:
        """Read every expert folder and fill ``config.layout``; their factors by expert, then module."""
        from lmadapt.models.fingerprint import fingerprint

        cfg, base_fp = self.config, fingerprint(model)
        modules = dict(model.named_modules())
        read = [read_expert(p, f"method.experts[{i}]", modules, base_fp) for i, p in enumerate(cfg.experts)]
        names = cfg.expert_names or [_expert_name(p) for p in cfg.experts]
        if len(set(names)) != len(names):
            raise LmadaptError(f"method.experts: the folders' names {names} repeat; name the experts with "
                               f"method.expert_names")
        covered = {m for _, f in read for m in f}
        if cfg.target_modules:
            wanted = {n for n, _ in find_modules(model, cfg.target_modules, exclude=cfg.exclude_modules)}
            missing = sorted(wanted - covered)
            if missing:
                more = f" and {len(missing) - 1} more module(s)" if len(missing) > 1 else ""
                raise LmadaptError(f"method.target_modules selects {missing[0]}{more}, which no expert adapts; target "
                                   f"modules the experts adapt")
        else:
            wanted = {m for m in covered if not any(name_matches(m, e) for e in cfg.exclude_modules)}
        cfg.layout = [{"name": name, **entry, "modules": sorted(m for m in f if m in wanted)}
                      for name, (entry, f) in zip(names, read)]
        empty = [e["name"] for e in cfg.layout if not e["modules"]]
        if empty:
            raise LmadaptError(f"method: expert {empty[0]!r} adapts none of the target modules; drop it or widen "
                               f"method.target_modules")
        return [f for _, f in read]

    def _layers(self, model: nn.Module) -> list[tuple[str, MeteoraLinear]]:
        return list(modules_of_type(model, MeteoraLinear))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        layers = [m for _, m in self._layers(model)]
        groups = [ParamGroup("meteora_gate", [m.meteora_gate for m in layers])]
        if self.config.train_loras:
            groups.append(ParamGroup("meteora_experts", [p for m in layers for p in (m.meteora_A, m.meteora_B)]))
        return groups

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        cfg = self.config
        if not getattr(self, "_filled", True):
            raise LmadaptError("method.layout is given, so the experts' factors must come from a saved meteora "
                               "adapter, and none was loaded: set init_adapter to that folder, or clear layout "
                               "to read the expert folders")
        logits = [m.take_logits() for _, m in self._layers(ctx.model)]
        if cfg.gate_loss == "none" or any(g is None for g in logits):
            return None
        if cfg.gate_loss == "balance":
            return cfg.balance_loss_coef * balance_loss(logits, cfg.top_k, ctx.batch.get("attention_mask"))
        task_ids = ctx.batch.get("task_ids")
        if task_ids is None:
            raise LmadaptError("method.gate_loss is 'task' (the paper's gate cross-entropy), which needs each "
                               "training row's task id, and the batch has none: set data.train_tasks (the expert "
                               "number of each data.train entry), or set method.gate_loss: balance")
        n = logits[0].shape[-1]
        if int(task_ids.max()) >= n:
            raise LmadaptError(f"data.train_tasks names task {int(task_ids.max())}, but there are {n} experts: a task "
                               f"id is an expert's position in method.experts (0 to {n - 1})")
        return cfg.task_loss_coef * task_cross_entropy(logits, task_ids)

    def merge(self, model: nn.Module) -> None:
        raise LmadaptError("a meteora adapter cannot be merged into the base weights: each token's update depends on "
                           "the experts its gates choose for it; serve it with lmadapt.load(..., adapter=...)")

    unmerge = merge

    def unload(self, model: nn.Module) -> None:
        """Put the plain linear layers back (the base weights were never changed)."""
        for name, m in self._layers(model):
            replace_module(model, name, m.as_linear())

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Adapter key -> the tensor (or view) it saves and loads."""
        out = {}
        for name, m in self._layers(model):
            out[f"{PEFT_PREFIX}{name}.meteora_gate"] = m.meteora_gate.detach()
            for e in range(len(m.spans)):
                if (pair := m.factors(e)) is not None:
                    out[f"{PEFT_PREFIX}{name}.meteora_experts.{e}.lora_A.weight"] = pair[0]
                    out[f"{PEFT_PREFIX}{name}.meteora_experts.{e}.lora_B.weight"] = pair[1]
        return out

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self._tensors(model)

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_tensors(self._tensors(model), state, "different base model, experts or target modules?")
        self._filled = True

    def adapter_config(self) -> dict[str, Any]:
        return {}  # not a PEFT method: the lmadapt record in adapter_config.json identifies the files


@dataclass
class GateChoices:
    """What every gate chose for each token of one text (:func:`gate_choices`)."""

    tokens: list[str]  # the text's tokens, each decoded on its own
    experts: list[str]  # expert names; expert e is experts[e]
    chosen: dict[str, torch.Tensor]  # module -> (tokens, k) expert numbers, best first
    weights: dict[str, torch.Tensor]  # module -> (tokens, k) their weights

    def share(self, module: str | None = None) -> dict[str, float]:
        """Expert name -> its share of the top-k choices over all tokens, in every module (or in ``module``)."""
        picks = torch.cat([c.reshape(-1) for m, c in self.chosen.items() if module in (None, m)])
        counts = torch.bincount(picks, minlength=len(self.experts)).double()
        return {name: float(c / counts.sum()) for name, c in zip(self.experts, counts)}

    def per_token(self) -> list[dict[str, float]]:
        """For each token: expert name -> its share of that token's top-k choices over every module."""
        picks = torch.cat(list(self.chosen.values()), dim=1)  # (tokens, modules * k)
        counts = F.one_hot(picks, len(self.experts)).sum(1).double() / picks.shape[1]
        return [dict(zip(self.experts, row.tolist())) for row in counts]


def gate_choices(model: nn.Module, tokenizer: Any, text: str) -> GateChoices:
    """Run ``text`` through a model holding a meteora adapter and report each gate's experts and weights per token."""
    layers = list(modules_of_type(model, MeteoraLinear))
    if not layers:
        raise LmadaptError("gate_choices: the model holds no meteora layers; load a meteora adapter first, e.g. "
                           "lmadapt.load(adapter='runs/meteora/adapter')")
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model_device(model))
    for _, m in layers:
        m.capture = []
    try:
        with torch.no_grad():
            model(input_ids=ids)
        chosen = {n: m.capture[0][0] for n, m in layers}
        weights = {n: m.capture[0][1] for n, m in layers}
    finally:
        for _, m in layers:
            m.capture = None
    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    return GateChoices(tokens, list(layers[0][1].expert_names), chosen, weights)
