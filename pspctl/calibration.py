"""η measured on calibration inputs, for `merge --task` (docs/policy.md, "η").

Proposition 2's prediction divides by η, how well a layer's inputs align with its weights,
which no weight file tells. When the task file gives calibration inputs (`load_data(k,
"calib")`), each input model runs a few of them with forward hooks on the candidate layers
(the hooks `analyze` uses: `pspctl.analysis.function.capture`), and each layer's energy-weighted
η is measured on model k's own inputs:

    η_k² = Σ_{p,i} ⟨w_i, x_p⟩² / Σ_{p,i} ‖w_i‖² ‖x_p‖²

Cost: one forward pass per model over at most `samples` inputs, one model in memory at a
time (its tensors read once more from the inputs). Layers the hooks cannot see (a weight that
is not a direct parameter of a Linear or Conv, an embedding, a layer never called) keep the
prior.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from pspctl.analysis.function import capture, layer_sums
from pspctl.checkpoints import Checkpoint
from pspctl.task import Task, load_model, on_task_data, run_model
from pspctl.types import CALIB_SAMPLES, Progress

__all__ = ["CALIB_SAMPLES", "Etas", "measure_etas"]


@dataclass
class Etas:
    """Per tensor, η_k for each of the K contexts; `source` says where they were measured."""

    values: dict[str, list[float]] = field(default_factory=dict)
    source: str = ""

    def get(self, name: str) -> list[float] | None:
        return self.values.get(name)


def measure_etas(
    task: Task,
    checkpoints: Sequence[Checkpoint],
    names: Sequence[str],
    *,
    samples: int = CALIB_SAMPLES,
    progress: Progress | None = None,
) -> Etas:
    """η per context for each tensor of `names` the hooks can measure in every context.

    Raises:
        TaskError: the task has no load_data(), or its model does not fit its data.
        MismatchError: a checkpoint does not fit the task's model.
    """
    tick = progress or (lambda done, total, item: None)
    per: dict[str, list[float]] = {}
    for k, ckpt in enumerate(checkpoints):
        tick(k, len(checkpoints), f"η on context {k}'s calib inputs")
        state: Mapping = {n: ckpt[n] for n in ckpt.names}
        model = load_model(task, state, f"input {ckpt.path}")
        what = f"load_data({k}, 'calib')"
        with on_task_data(task.source, what):
            inputs = task.inputs(k, "calib", samples)
            caps = capture(model, list(names), partial(run_model, model, inputs))
        for name, cap in caps.items():
            W = state[name].float()
            eta = layer_sums(cap, W, W, None).eta_rms if cap.calls else None
            if eta is not None and eta > 0 and (k == 0 or name in per):
                per.setdefault(name, []).append(eta)
        per = {n: e for n, e in per.items() if len(e) == k + 1}  # measured in every context so far
        del model, state, caps
    return Etas(per, f"{task.source}: load_data(k, 'calib'), {samples} inputs per context")
