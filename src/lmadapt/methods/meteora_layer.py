"""MeteoRA's layer: a linear layer, N LoRA experts side by side and a gate that picks k of them per token.

"MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models", Xu et al., arXiv:2405.13053 (the equations:
:mod:`lmadapt.methods.meteora`, METHODS.md §10). Also the routing weights of both paths and the two gate losses,
as functions of the gate logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.data.tokens import IGNORE
from lmadapt.models.tree import plain_linear


def route(logits: torch.Tensor, k: int, weights: str = "fast", temperature: float = 1.0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, idx), both (..., k), best first, from gate logits (..., N): METHODS.md §10's fast or reference path."""
    if weights == "reference":
        w, idx = torch.topk(logits.float().softmax(-1), k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx
    top, idx = torch.topk(logits.float(), k, dim=-1)
    return (torch.ones_like(top) if k == 1 else (top / temperature).softmax(-1)), idx


def task_cross_entropy(logits: Sequence[torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor:
    """The paper's gate loss: every gate's logits (B, L, N) at position t against ``task_ids`` (B, L) at t + 1,
    all gates concatenated, mean over the positions whose id is set (-100: none)."""
    target = task_ids[:, 1:].reshape(-1)
    valid = target != IGNORE
    if not bool(valid.any()):
        return logits[0].sum() * 0.0
    flat = torch.cat([g[:, :-1].reshape(-1, g.shape[-1])[valid] for g in logits]).float()
    return F.cross_entropy(flat, target[valid].repeat(len(logits)))


def balance_loss(logits: Sequence[torch.Tensor], k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's load-balancing loss (Fedus et al., arXiv:2101.03961, eq. 4-6) per gate,
    ``N * sum_i f_i P_i`` with f_i the share of the top-k choices that went to expert i and P_i its mean
    router probability, over the tokens ``mask`` (B, L) keeps; averaged over the gates (1 when balanced)."""
    terms = []
    for g in logits:
        flat = g.reshape(-1, g.shape[-1]).float()
        if mask is not None:
            flat = flat[mask.reshape(-1).to(torch.bool)]
        n = flat.shape[-1]
        chosen = F.one_hot(flat.topk(k, dim=-1).indices, n).sum(-2).float()
        terms.append(n * (chosen.mean(0) / k * flat.softmax(-1).mean(0)).sum())
    return torch.stack(terms).mean()


class MeteoraLinear(nn.Module):
    """A linear layer, its N experts' factors side by side and a gate::

        y = W0 x + b + sum_e mix_e(x) s_e B_e A_e dropout(x),   mix(x) = w on the k experts route() picks, else 0

    Keeps the base ``weight``/``bias`` Parameters under their names. ``meteora_A`` (sum r_e x d_in) and
    ``meteora_B`` (d_out x sum r_e) hold expert e's factors in columns ``spans[e]`` (None: it does not adapt
    this module); ``meteora_gate`` is W_g. All in fp32, cast per call (the gate runs in fp32 always).
    """

    casts_own_parameters = True

    def __init__(self, base: nn.Linear, ranks: list[int], scales: list[float], gate: torch.Tensor,
                 names: Sequence[str], *, top_k: int, weights: str = "fast", temperature: float = 1.0,
                 dropout: float = 0.0, train_loras: bool = False, keep_logits: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device, total = base.weight.device, sum(ranks)
        self.meteora_gate = nn.Parameter(gate.to(device=device, dtype=torch.float32))
        self.meteora_A = nn.Parameter(torch.zeros(total, self.in_features, device=device),
                                      requires_grad=train_loras)
        self.meteora_B = nn.Parameter(torch.zeros(self.out_features, total, device=device),
                                      requires_grad=train_loras)
        counts = torch.tensor(ranks)
        self.register_buffer("column_expert", torch.arange(len(ranks)).repeat_interleave(counts).to(device),
                             persistent=False)
        self.register_buffer("column_scale", torch.tensor(scales).repeat_interleave(counts).to(device),
                             persistent=False)
        ends = counts.cumsum(0).tolist()
        self.spans = [(end - r, end) if r else None for r, end in zip(ranks, ends)]
        self.expert_names = tuple(names)
        self.top_k, self.weights, self.temperature = top_k, weights, temperature
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.keep_logits = keep_logits  # a gate loss reads them after the forward
        self.last_logits: torch.Tensor | None = None
        self.capture: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # set by gate_choices
        self._enabled = True

    @property
    def adapter_enabled(self) -> bool:
        """False: the layer gives the base model's outputs."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled = value

    def factors(self, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views (no autograd) of expert ``expert``'s (A, B) here, or None where it adapts nothing."""
        span = self.spans[expert]
        if span is None:
            return None
        return self.meteora_A.detach()[span[0]:span[1]], self.meteora_B.detach()[:, span[0]:span[1]]

    def take_logits(self) -> torch.Tensor | None:
        """The gate logits (B, L, N) of the last forward with autograd on, handed over once."""
        logits, self.last_logits = self.last_logits, None
        return logits

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's ``weight`` and ``bias``."""
        return plain_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self._enabled:
            return out
        flat = x.reshape(-1, self.in_features)
        with torch.autocast(x.device.type, enabled=False):  # routing decided in fp32
            logits = F.linear(flat.float(), self.meteora_gate)
        w, idx = route(logits, self.top_k, self.weights, self.temperature)
        if self.keep_logits and torch.is_grad_enabled():
            self.last_logits = logits.view(*x.shape[:-1], -1)
        if self.capture is not None:
            self.capture.append((idx.cpu(), w.detach().cpu()))
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        mix = torch.zeros_like(logits).scatter(1, idx, w)  # (T, N): w_e on the chosen experts, 0 elsewhere
        column_weight = (mix.index_select(1, self.column_expert) * self.column_scale).to(dtype)
        low = F.linear(self.dropout(flat).to(dtype), self.meteora_A.to(dtype)) * column_weight
        return out + F.linear(low, self.meteora_B.to(dtype)).view(out.shape)

    def extra_repr(self) -> str:
        ranks = [0 if s is None else s[1] - s[0] for s in self.spans]
        return f"in={self.in_features}, out={self.out_features}, experts={len(ranks)}, ranks={ranks}, k={self.top_k}"
