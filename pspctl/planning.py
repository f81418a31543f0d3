"""Merge planning, the measured policy: superpose the largest set of tensors that keeps every
context within budget (`merge --policy measured`, `analyze --max-drop`).

The default rule (pspctl.policy) decides from shapes alone. This one runs the models. For
each candidate tensor (floating, ≥2 dims, not matched by --keep) it builds exactly what
merge would store (same contexts from (seed, name), same dtype), and on each context's
calibration data measures, with only that tensor superposed:

    drop   = calib accuracy of the original − of the model with Ŵ_k swapped in (points)
    error  = ‖f̂(x) − f(x)‖ / ‖f(x)‖ over the calib inputs

Candidates whose superposition saves no bytes (rotation contexts cost K·M² floats) are
kept. The others are ranked by bytes saved per unit of mean squared output error (residual
variances add across layers, so this is the exchange rate). If all of them together stay
within budget they are all superposed; otherwise they are added greedily in rank order,
each kept only if the whole set still satisfies, on every context,
drop ≤ max_drop (and error ≤ max_output_error when given). Cost: 2·C·K calib evaluations
at most, for C candidates.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from pspctl.checkpoints import Checkpoint
from pspctl.contexts import Kind
from pspctl.dtypes import itemsize
from pspctl.errors import PolicyError, TaskError
from pspctl.fileformat import SuperposedWriter
from pspctl.merge import BASE_MODES, MergeOptions, centre_options, open_base, store_tensor
from pspctl.policy import FLOAT_DTYPES, Decision, Policy, Role, matches_any
from pspctl.superpose import fan_in
from pspctl.task import Task, load_model, on_task_data, run_model
from pspctl.types import Progress

__all__ = ["CandidateResult", "MeasuredPolicy", "measured_policy", "policy_for_merge"]


@dataclass
class CandidateResult:
    name: str
    bytes_saved: int
    drop: list[float | None]  # per context, with only this tensor superposed
    output_error: list[float]
    chosen: bool = False


@dataclass
class MeasuredPolicy:
    """The outcome: what to superpose, what to keep, and what it costs on the calib data."""

    superpose: list[str]
    keep: list[str]
    max_drop: float
    max_output_error: float | None
    metric: str | None  # "calib_accuracy", or None when the targets are not class labels
    original: list[float | None]  # per context calib accuracy of the originals
    drop: list[float | None]  # per context, with the chosen set superposed
    output_error: list[float]
    bytes_saved: int
    candidates: list[CandidateResult] = field(default_factory=list)
    centres: dict[str, str] = field(default_factory=dict)  # each candidate's centre, as measured

    def policy(self, base: Policy = Policy()) -> Policy:
        """A Policy for merge that reproduces this choice, on the centres measured; its
        decisions say "measured"."""
        superpose = tuple(glob.escape(n) for n in self.superpose) + base.superpose
        keep = tuple(glob.escape(n) for n in self.keep) + base.keep
        centres = tuple((n, self.centres[n]) for n in self.superpose if n in self.centres)
        return replace(base, keep=keep, superpose=superpose, origin="measured", centres=centres)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Context:
    inputs: tuple[Tensor, ...]
    targets: Tensor | None
    outputs: Tensor
    accuracy: float | None


def _accuracy(out: Tensor, targets: Tensor | None) -> float | None:
    if (
        targets is None
        or targets.is_floating_point()
        or out.dim() < 2
        or tuple(targets.shape) != tuple(out.shape[:-1])
    ):
        return None
    return 100.0 * float((out.argmax(-1) == targets).float().mean())


def measured_policy(
    checkpoints: Sequence[Checkpoint],
    task: Task,
    *,
    kind: Kind | str,
    seed: int = 0,
    max_drop: float = 0.5,
    max_output_error: float | None = None,
    base: Policy = Policy(),
    dtype: str | None = None,
    max_samples: int = 256,
    progress: Progress | None = None,
    centre: str = "none",
    parent: Checkpoint | None = None,
    link_base: bool = False,
) -> MeasuredPolicy:
    """Choose the tensors to superpose by measuring their effect on calibration data.

    Args:
        checkpoints: the K models to merge, in context order.
        task: a loaded Task with build_model and load_data (split "calib").
        kind, seed, dtype: as for merge, so the measured Ŵ_k are exactly what merge stores.
        max_drop: allowed calib accuracy drop per context, in points.
        max_output_error: optional bound on the end-to-end relative output error per context.
        base: its keep globs are never superposed, its superpose globs always are.
        centre: merge's `--base`: "none", "mean", "base" (on `parent`, linked or stored), or
            "auto": per tensor, of the centres that save bytes, the one whose predicted
            error × bytes is least (a centre must cut the error by more than it multiplies
            the bytes).

    Raises:
        TaskError: the task has no load_data, or its calib split is empty.
        PolicyError: the calib targets are not class labels and no max_output_error was given.
    """
    if task.load_data is None:
        raise TaskError(f"{task.source}: --policy measured needs load_data")
    kind, K = Kind(kind), len(checkpoints)
    infos = list(checkpoints[0].infos.values())
    forced = [i.name for i in infos if i.numel and matches_any(i.name, base.superpose)]  # empty: kept anyway
    eligible = [
        i for i in infos
        if i.dtype in FLOAT_DTYPES and len(i.shape) >= 2 and i.numel and not matches_any(i.name, base.keep)
        and i.name not in forced
    ]  # fmt: skip
    tick = progress or (lambda done, total, item: None)
    contexts: list[_Context] = []
    for k, ckpt in enumerate(checkpoints):
        inputs, targets = task.samples(k, "calib", max_samples)
        model = load_model(task, {n: ckpt[n] for n in ckpt.names}, str(ckpt.path))
        with on_task_data(task.source, f"load_data({k}, 'calib')"):
            out = run_model(model, inputs)
        contexts.append(_Context(inputs, targets, out, _accuracy(out, targets)))
    metric = "calib_accuracy" if all(c.accuracy is not None for c in contexts) else None
    if metric is None and max_output_error is None:
        raise PolicyError(
            "the calib targets are not class labels: give a max output error instead of --max-drop"
        )

    # What merge would store, one superposed tensor per name (one model's worth in memory).
    stored = SuperposedWriter(kind, K, linked=link_base)
    merging = centre if centre in BASE_MODES else "base"
    options = MergeOptions(
        kind=kind,
        seed=seed,
        dtype=dtype,
        allow_nonfinite=True,
        base=merging,
        link_base=link_base,
        policy=base,
    )
    if merging == "base" and parent is None:
        raise ValueError("centre 'base' needs the parent checkpoint")
    saved: dict[str, int] = {}
    centres: dict[str, str] = {}
    for info in eligible + [i for i in infos if i.name in forced]:
        own = math.prod(info.shape) * itemsize(info.dtype)
        found = centre_options(info, checkpoints, options, parent) if merging == "auto" else []
        # A centre whose stored base leaves nothing saved (3 complex inputs) is no candidate.
        found = [o for o in found if o.nbytes < K * own] or found
        if found:
            centres[info.name] = min(found, key=lambda o: (o.error * o.nbytes, o.error)).centre
        else:  # auto on K equal copies (stored once, whatever the centre), or a fixed centre
            centres[info.name] = "none" if merging == "auto" else merging
        decision = Decision(
            info.name,
            Role.SUPERPOSED,
            "measured",
            fan_in(info.shape, info.fan_in_axis),
            0.0,
            centre=centres[info.name],
        )
        base_tensor = parent[info.name] if parent is not None and centres[info.name] == "base" else None
        saved[info.name] = K * own - store_tensor(
            stored, info, decision, checkpoints, options, base=base_tensor
        )
    # Superposing saves nothing where the contexts outweigh the copies (rotation, small N).
    candidates = eligible
    eligible = [i for i in candidates if saved[i.name] > 0]

    def measure(names: Sequence[str]) -> tuple[list[float | None], list[float]]:
        drops, errs = [], []
        for k, (ckpt, c) in enumerate(zip(checkpoints, contexts, strict=True)):
            state = {n: ckpt[n] for n in ckpt.names}
            for n in names:
                state[n] = stored.retrieve(n, k)
            out = run_model(load_model(task, state, f"context {k}"), c.inputs)
            acc = _accuracy(out, c.targets)
            drops.append(None if acc is None or c.accuracy is None else c.accuracy - acc)
            den = float(c.outputs.double().norm())
            errs.append(float((out.double() - c.outputs.double()).norm()) / den if den > 0 else 0.0)
        return drops, errs

    def fits(drops: list[float | None], errs: list[float]) -> bool:
        ok = metric is None or all(d is not None and d <= max_drop + 1e-9 for d in drops)
        return ok and (max_output_error is None or all(e <= max_output_error for e in errs))

    results = []
    for i, info in enumerate(eligible):
        tick(i, 2 * len(eligible), info.name)
        d, e = measure([*forced, info.name])
        results.append(CandidateResult(info.name, saved[info.name], d, e))
    rank = sorted(results, key=lambda r: -r.bytes_saved / (sum(x * x for x in r.output_error) / K + 1e-12))
    chosen = list(forced)
    drops, errs = measure(chosen + [r.name for r in rank])
    if fits(drops, errs):
        chosen += [r.name for r in rank]
    else:
        drops, errs = measure(chosen)
        for j, r in enumerate(rank):
            tick(len(eligible) + j, 2 * len(eligible), r.name)
            if not fits(r.drop, r.output_error):
                continue  # fails alone: it cannot fit in a larger set
            d, e = measure([*chosen, r.name])
            if fits(d, e):
                chosen.append(r.name)
                drops, errs = d, e
    for r in results:
        r.chosen = r.name in chosen
    keep = [i.name for i in candidates if i.name not in chosen]
    return MeasuredPolicy(
        superpose=chosen, keep=keep, max_drop=max_drop, max_output_error=max_output_error, metric=metric,
        original=[c.accuracy for c in contexts], drop=drops, output_error=errs,
        bytes_saved=sum(saved[n] for n in chosen), candidates=results, centres=centres,
    )  # fmt: skip


def policy_for_merge(
    inputs: Sequence[str | Path],
    options: MergeOptions,
    *,
    max_drop: float,
    max_output_error: float | None = None,
    progress: Progress | None = None,
) -> tuple[Policy, MeasuredPolicy]:
    """`merge --policy measured`: measure on the task's calib data, return the Policy to merge with.

    Args:
        inputs: the checkpoints to merge.
        options: the MergeOptions (kind, seed, dtype, task, trust_pickle and the user's policy).

    Raises:
        PolicyError: no --task; TaskError, MismatchError, InputError as for merge and analyze.
    """
    from pspctl.merge import open_inputs
    from pspctl.task import load_task

    if options.task is None:
        raise PolicyError("--policy measured needs --task (a task file with load_data)")
    checkpoints = open_inputs(inputs, options)
    parent = None if options.base in BASE_MODES else open_base(options, checkpoints[0])
    task = load_task(options.task)
    result = measured_policy(
        checkpoints, task, kind=options.kind, seed=options.seed, max_drop=max_drop,
        max_output_error=max_output_error, base=options.policy,
        dtype=options.dtype, progress=progress, centre=options.base, parent=parent, link_base=options.link_base,
    )  # fmt: skip
    return result.policy(options.policy), result
