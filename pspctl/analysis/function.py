"""Function-space retrieval error: what a layer's output loses when W_k becomes Ŵ_k.

Inputs are captured with forward hooks on the *original* model k, so one layer's error does
not compound into the next. For a Linear or Conv layer with weight rows w_i and inputs (or
conv patches) x_p, over the whole batch:

    measured     = ‖Ŵx − Wx‖ / ‖Wx‖                       (bias left out, as in the paper)
    eta_mean     = mean_{p,i} |⟨w_i,x_p⟩| / (‖w_i‖‖x_p‖)    (the paper's η, averaged)
    eta_rms²     = Σ_{p,i} ⟨w_i,x_p⟩² / Σ_{p,i} ‖w_i‖²‖x_p‖²
    predicted    = sqrt(v Σ_{s≠k}‖D_s‖²/M) / (eta_rms ‖W_k‖)   (Proposition 2, `policy.predicted_errors`)
    predicted_row_norms² = v/M · Σ_{p,i} S_i ‖x_p‖² / Σ_{p,i} ⟨w_i,x_p⟩²,  S_i = Σ_{s≠k}‖d_{s,i}‖²

D_s is what is superposed for model s: its weight, or its delta from the base in a centred
tensor (the same prediction `merge` chooses with).

The batch ratio is a ratio of sums, so the η that predicts it is the energy-weighted eta_rms,
not the plain mean (for random inputs, mean |cos| is sqrt(2/π)/√M while the RMS is 1/√M).
`predicted` uses whole-tensor norms; `predicted_row_norms` the other models' actual row norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pspctl.checkpoints import checkpoint_names
from pspctl.superpose import as_matrix
from pspctl.task import as_tensor

__all__ = ["Capture", "LayerSums", "capture", "layer_sums", "matrix_probe_sums"]


@dataclass
class Capture:
    """The (args, kwargs) of every call of one module during a forward pass."""

    module: nn.Module
    param: str
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


@dataclass
class LayerSums:
    """Sums over the batch; `finish` turns them into the report's numbers."""

    method: str
    diff_sq: float = 0.0
    signal_sq: float = 0.0
    cos_sum: float = 0.0
    cos_count: int = 0
    energy: float = 0.0  # Σ ‖w_i‖²‖x_p‖²
    other_energy: float = 0.0  # Σ S_i ‖x_p‖²

    def add(self, other: LayerSums) -> None:
        for f in ("diff_sq", "signal_sq", "cos_sum", "cos_count", "energy", "other_energy"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    @property
    def eta_rms(self) -> float | None:
        """The energy-weighted η, sqrt(Σ⟨w_i,x_p⟩² / Σ‖w_i‖²‖x_p‖²); None where not measurable."""
        if self.method == "generic" or self.energy <= 0 or self.signal_sq <= 0:
            return None
        return math.sqrt(self.signal_sq / self.energy)

    def finish(self, v: float, M: int, predict: Callable[[float], float]) -> dict[str, float | None]:
        """measured, eta_mean, eta_rms, predicted (`predict(eta_rms)`), predicted_row_norms."""
        measured = math.sqrt(self.diff_sq / self.signal_sq) if self.signal_sq > 0 else math.nan
        eta_rms = self.eta_rms
        if eta_rms is None:
            return {"measured": measured, "eta_mean": None, "eta_rms": None, "predicted": None,
                    "predicted_row_norms": None}  # fmt: skip
        return {
            "measured": measured,
            "eta_mean": self.cos_sum / self.cos_count if self.cos_count else None,
            "eta_rms": eta_rms,
            "predicted": predict(eta_rms),
            "predicted_row_norms": math.sqrt(v * self.other_energy / (M * self.signal_sq))
            if self.other_energy > 0
            else None,
        }


def capture(model: nn.Module, names: list[str], run: Callable[[], Any]) -> dict[str, Capture]:
    """Run `run()` with hooks on the modules owning the tensors `names`; return their inputs.

    Tensors that are not a direct parameter of a submodule (e.g. a buffer) are left out.
    `names` are the checkpoint's, renamed as transformers renames them (`checkpoint_names`).
    """
    caps: dict[str, Capture] = {}
    handles = []
    in_model = checkpoint_names(model, names)
    for name in names:
        path, _, param = in_model.get(name, name).rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(module._parameters.get(param), nn.Parameter):
            continue
        cap = caps[name] = Capture(module, param)

        def hook(_m: nn.Module, args: tuple, kwargs: dict, _out: Any, cap: Capture = cap) -> None:
            cap.calls.append((_detach(args), _detach(kwargs)))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return caps


def _detach(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, tuple | list):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _sums(y: Tensor, y_hat: Tensor, psq: Tensor, W: Tensor, others: Tensor | None, method: str) -> LayerSums:
    """y, y_hat: [P, N]; psq: [P, G] squared input (patch) norms per group; W: [N, M]."""
    N, G = y.shape[1], psq.shape[1]
    w_sq = W.reshape(N, -1).double().square().sum(1)  # [N]
    group = torch.arange(N) // (N // G)
    x_sq = psq.double()[:, group]  # [P, N]
    s = LayerSums(method)
    s.diff_sq = float((y_hat.double() - y.double()).square().sum())
    s.signal_sq = float(y.double().square().sum())
    s.energy = float((x_sq * w_sq).sum())
    if others is not None:
        s.other_energy = float((x_sq * others.double()).sum())
    denom = (x_sq * w_sq).sqrt()
    valid = denom > 0
    s.cos_sum = float((y.double().abs()[valid] / denom[valid]).sum())
    s.cos_count = int(valid.sum())
    return s


@torch.no_grad()  # the generic path calls the module, whose other parameters require grad
def layer_sums(cap: Capture, W: Tensor, W_hat: Tensor, others: Tensor | None) -> LayerSums:
    """Compare one layer's output under W and Ŵ on every captured call.

    Args:
        cap: the module and its captured inputs.
        W, W_hat: the original and the retrieved weight, float32.
        others: [N] S_i = Σ_{s≠k}‖w_{s,i}‖², or None.
    """
    module = cap.module
    total = LayerSums("generic")
    for args, kwargs in cap.calls:
        if isinstance(module, nn.Linear) and cap.param == "weight" and args:
            x = args[0].float()
            x2 = x.reshape(-1, x.shape[-1])
            y, y_hat = F.linear(x2, W), F.linear(x2, W_hat)
            part = _sums(y, y_hat, x2.square().sum(1, keepdim=True), W, others, "linear")
        elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and cap.param == "weight" and args:
            x = args[0].float()
            # _conv_forward applies padding_mode; a ones kernel per group gives ‖patch‖².
            y = module._conv_forward(x, W, None)
            y_hat = module._conv_forward(x, W_hat, None)
            ones = torch.ones(module.groups, *W.shape[1:])
            psq = module._conv_forward(x.square(), ones, None)
            flat = lambda t: t.movedim(1, -1).reshape(-1, t.shape[1])  # noqa: E731
            part = _sums(flat(y), flat(y_hat), flat(psq), W, others, "conv")
        else:
            y = as_tensor(functional_call(module, {cap.param: W}, args, kwargs)).float()
            y_hat = as_tensor(functional_call(module, {cap.param: W_hat}, args, kwargs)).float()
            part = LayerSums("generic")
            part.diff_sq = float((y_hat.double() - y.double()).square().sum())
            part.signal_sq = float(y.double().square().sum())
        total.method = part.method
        total.add(part)
    return total


def matrix_probe_sums(
    W: Tensor,
    W_hat: Tensor,
    others: Tensor | None,
    *,
    samples: int,
    generator: torch.Generator,
    axis: int | None = None,
) -> LayerSums:
    """Without a model: Gaussian probe vectors applied to the weight viewed as [N, M] (fan-in `axis`)."""
    W2, W_hat2 = as_matrix(W, axis), as_matrix(W_hat, axis)
    x = torch.randn(samples, W2.shape[1], generator=generator)
    s = _sums(x @ W2.T, x @ W_hat2.T, x.square().sum(1, keepdim=True), W2, others, "matrix")
    return s
