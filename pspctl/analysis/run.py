"""`analyze`: every measurement of a superposed file, streamed one tensor, then one context, at a time.

Memory: the weight pass holds one tensor (the superposed one and one original at a time);
the context pass holds one context's models (original, retrieved, one pruned variant) and
the captured inputs of its layers. K full models are never held together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from pspctl import sources
from pspctl.analysis.advice import advice, recommend
from pspctl.analysis.function import capture, layer_sums, matrix_probe_sums
from pspctl.analysis.pruning import (
    magnitude_sample,
    model_size,
    prune_superposed,
    same_budget_state,
    thresholds,
)
from pspctl.analysis.report import ContextSummary, LayerError, PruneResult, Report
from pspctl.analysis.weights import stored_values, tensor_pass
from pspctl.checkpoints import Checkpoint
from pspctl.dtypes import itemsize
from pspctl.errors import UntrustedTaskError
from pspctl.fileformat import SuperposedFile, open_superposed
from pspctl.policy import Role, predicted_errors
from pspctl.task import (
    Task,
    check_fits,
    load_model,
    load_task,
    lower_is_better,
    on_task_data,
    primary_metric,
    run_model,
)
from pspctl.types import Progress

__all__ = ["DEFAULT_SPARSITIES", "analyze", "lower_is_better"]

DEFAULT_SPARSITIES = (0.5, 0.7, 0.9)


def analyze(
    file: str | Path | SuperposedFile = "w.safetensors",
    *,
    originals: Sequence[str | Path] | None = None,
    task: str | Path | Task | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    max_samples: int = 256,
    max_drop: float | None = None,
    max_output_error: float | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> Report:
    """Measure how well each model survives in a superposed file, and compare with pruning.

    Args:
        file: the superposed file.
        originals: the K original checkpoints in context order (default: the paths the file records).
        task: a task spec or loaded Task (default: the one the file records).
        sparsities: global magnitude-pruning levels for the superposed values.
        max_samples: calibration (or probe) inputs per context.
        max_drop: if given, also run the measured policy for this calib accuracy drop (points).
        max_output_error: with max_drop, also bound the end-to-end output error.
        trust_pickle: allow pickled originals.
        seed: seed of the random probes.
        progress: called with (done, total, item).

    Returns:
        The Report; `report.notes` says in one line each what could not be measured.

    Raises:
        PspctlError subclasses: unreadable file, bad task, originals that do not match, ...
    """
    sf = open_superposed(file)
    notes: list[str] = []
    task_obj, note = _find_task(sf, task)
    notes += [note] if note else []
    if task_obj is not None:
        check_fits(task_obj.build_model(), sf.shapes(), str(sf.path))
    origs, note = sources.find_originals(sf, originals, trust_pickle=trust_pickle)
    notes += [note] if note else []
    _, model_values = model_size(sf)
    K, kind = sf.num_contexts, sf.kind
    names, sup = sf.names(), sf.names(Role.SUPERPOSED)
    report = Report(
        file=str(sf.path), kind=kind.value, num_contexts=K, labels=list(sf.labels),
        file_bytes=sf.nbytes(), input_bytes=_input_bytes(sf, origs), stored_bytes=0,
        model_values=model_values, originals=[str(c.path) for c in origs] if origs else None,
        task=task_obj.source if task_obj else None, inputs=None, notes=notes,
        thresholds=[0.01, 0.1, 0.5],
    )  # fmt: skip
    tick = progress or (lambda done, total, item: None)
    steps = len(names) + K

    row_sq: dict[str, Tensor] = {}
    norms: dict[str, tuple[list[float], list[float]]] = {}  # superposed: (‖W_k‖², ‖D_k‖²) per context
    stored_bytes: dict[str, int] = {}
    for i, name in enumerate(names):
        tick(i, steps, name)
        tp = tensor_pass(sf, name, origs)
        if tp.error is not None:
            report.weights.append(tp.error)
        report.magnitudes += tp.magnitudes
        if tp.edges:
            report.edges[name] = tp.edges
        if tp.row_sq is not None and name in sup:
            row_sq[name] = tp.row_sq
        if tp.norms_sq is not None and tp.superposed_sq is not None and name in sup:
            norms[name] = (tp.norms_sq, tp.superposed_sq)
        stored_bytes[name] = tp.stored_bytes
    report.stored_bytes = sum(stored_bytes.values())
    plain = [n for n in sup if not sf.header.tensors[n].centred]
    if origs is not None and plain:  # centred tensors' residual is the deltas' share: small
        which = "" if len(plain) == len(sup) else " for the tensors superposed without a base"
        notes.append(
            f"weight-space error is about sqrt(v(K-1)) = {math.sqrt(kind.variance_factor * (K - 1)):.2f} by "
            f"design{which}; it is not what decides quality, the function-space error is"
        )

    sup_total = sum(math.prod(sf.header.tensors[n].shape) * (2 if kind.is_complex else 1) for n in sup)
    sample = magnitude_sample((stored_values(sf.superposed(n)) for n in sup), sup_total)
    taus = thresholds(sample, sparsities) if sup else [-1.0 for _ in sparsities]
    prune_rows = [PruneResult(s, 0.0, [], [], []) for s in sparsities]
    zeros = [0] * len(taus)
    for n in sup:  # one read per tensor for every sparsity
        mag = stored_values(sf.superposed(n)).abs()
        for i, tau in enumerate(taus):
            zeros[i] += int((mag <= tau).sum())
    for row, z in zip(prune_rows, zeros, strict=True):
        row.achieved = z / max(sup_total, 1)
    report.pruning = prune_rows

    gen = torch.Generator().manual_seed(seed)
    for k in range(K):
        tick(len(names) + k, steps, f"context {sf.labels[k]}")
        _context_pass(
            report, sf, k, task_obj, origs, (row_sq, norms), taus, gen, max_samples, report.stored_bytes / K
        )
    tick(steps, steps, "")
    report.advice = advice(sf, report, stored_bytes)
    if max_drop is not None:
        report.recommendation = recommend(sf, task_obj, origs, max_drop, max_output_error, max_samples, notes)
    return report


def _input_bytes(sf: SuperposedFile, origs: list[Checkpoint] | None) -> int:
    if origs is not None:
        return sum(c.nbytes() for c in origs)
    per = sum(math.prod(m.shape) * itemsize(m.dtype) for m in sf.header.tensors.values())
    return per * sf.num_contexts


def retrieved_state(sf: SuperposedFile, k: int, tau: float | None = None) -> dict[str, Tensor]:
    """Model k as retrieved from the file, with the superposed values pruned at τ if given."""
    out = {}
    for name, meta in sf.header.tensors.items():
        pruned = None
        if tau is not None and meta.role == Role.SUPERPOSED:
            pruned = prune_superposed(sf.superposed(name), tau)
        out[name] = sf.retrieve(name, k, superposed=pruned)
    out.update({alias: out[name] for alias, name in sf.tied.items()})  # tied: one tensor
    return out


def _inputs(
    task: Task, k: int, max_samples: int, gen: torch.Generator
) -> tuple[tuple[Tensor, ...], str] | None:
    """One context's calibration inputs, or random probes shaped like example_inputs()."""
    if task.load_data is not None:
        return task.inputs(k, "calib", max_samples), "calib"
    if task.example_inputs is not None:
        probes = []
        for e in task.example_inputs():
            shape = (max_samples, *e.shape[1:])
            if e.is_floating_point():
                probes.append(torch.randn(shape, generator=gen, dtype=e.dtype))
            else:
                probes.append(torch.randint(0, int(e.max()) + 1, shape, generator=gen, dtype=e.dtype))
        return tuple(probes), "probe"
    return None


def _find_task(sf: SuperposedFile, spec: str | Path | Task | None) -> tuple[Task | None, str | None]:
    """`spec` (a path, a module name or a loaded Task) or the task the file records; or a note.

    Raises:
        TaskError: the task cannot be imported or has no build_model.
    """
    if spec is None:
        recorded, found = sources.recorded_task(sf)
        if recorded is None and sf.header.hf is not None:
            return sources.hf_task(sf), (
                "no task file: the model is built from the recorded config.json (transformers); function-space "
                "error on random inputs made from the config; metrics need a task file (--task)"
            )
        if recorded is None:
            return (
                None,
                "no task (merge --task or --task): function-space error on random probes of the weights only",
            )
        if not found:
            return None, (
                f"task {recorded} (recorded by merge) not found: pass --task; "
                "function-space error on random probes of the weights only"
            )
        try:
            spec = load_task(recorded, recorded_in=sf.path)  # only a task the user has run (pspctl.trust)
        except UntrustedTaskError as e:
            return None, f"{e}; function-space error on random probes of the weights only"
    task = spec if isinstance(spec, Task) else load_task(spec)
    task.require("build_model")
    return task, None


def _metric(task: Task | None, model: torch.nn.Module, k: int) -> tuple[str, float] | None:
    if task is None or (task.evaluate is None and task.load_data is None):
        return None
    return primary_metric(task.metric(model, k))


def _norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


def _rel(a: Tensor, b: Tensor) -> float:
    den = float(b.double().norm())
    return float((a.double() - b.double()).norm()) / den if den > 0 else math.nan


def _context_pass(
    report: Report,
    sf: SuperposedFile,
    k: int,
    task: Task | None,
    origs: list[Checkpoint] | None,
    norms_in: tuple[dict[str, Tensor], dict[str, tuple[list[float], list[float]]]],
    taus: list[float],
    gen: torch.Generator,
    max_samples: int,
    budget: float,
) -> None:
    K, v = sf.num_contexts, sf.kind.variance_factor
    sup = sf.names(Role.SUPERPOSED)
    row_sq, norms = norms_in
    summary = ContextSummary(k, sf.labels[k], None, None, None, None, None, None, None)
    report.contexts.append(summary)
    got = _inputs(task, k, max_samples, gen) if task is not None else None
    if got is not None:
        report.inputs = got[1]
    ret_state = retrieved_state(sf, k)
    orig_state = {n: origs[k][n] for n in sf.names()} if origs is not None else None
    orig_model = load_model(task, orig_state, f"original {k}") if task and orig_state else None
    ret_model = load_model(task, ret_state, f"context {k} of {sf.path}") if task else None

    caps = {}
    y_orig = None
    what = (
        f"load_data({k}, 'calib')"
        if got and got[1] == "calib"
        else "random inputs shaped like example_inputs()"
    )
    if orig_model is not None and got is not None:
        out: list[Tensor] = []
        with on_task_data(task.source if task else "?", what):
            caps = capture(orig_model, sup, lambda: out.append(run_model(orig_model, got[0])))
        y_orig = out[0]
    if orig_state is not None:
        for name in sup:
            W, W_hat = orig_state[name].float(), ret_state[name].float()
            others = row_sq[name].sum(0) - row_sq[name][k] if name in row_sq else None
            cap = caps.get(name)
            if cap is not None and cap.calls:
                sums, src = layer_sums(cap, W, W_hat, others), got[1] if got else "probe"
            else:
                axis = sf.header.tensors[name].fan_in_axis
                sums = matrix_probe_sums(W, W_hat, others, samples=max_samples, generator=gen, axis=axis)
                src = "probe"
            M = sf.header.tensors[name].fan_in
            w_sq, d_sq = norms.get(name, ([1.0] * K, [1.0] * K))

            def predict(eta: float, M: int = M, w_sq: list[float] = w_sq, d_sq: list[float] = d_sq) -> float:
                # merge's prediction, with the η measured here: what merge would have predicted
                return predicted_errors(sf.kind, M, eta, w_sq, d_sq)[k]

            report.layers.append(LayerError(name, k, M, sums.method, src, **sums.finish(v, M, predict)))  # type: ignore[arg-type]

    m_orig = _metric(task, orig_model, k) if orig_model is not None else None
    m_ret = _metric(task, ret_model, k) if ret_model is not None else None
    summary.metric_name = (m_orig or m_ret or (None, None))[0]
    summary.original_metric = m_orig[1] if m_orig else None
    summary.retrieved_metric = m_ret[1] if m_ret else None
    if y_orig is not None and ret_model is not None and got is not None:
        with on_task_data(task.source if task else "?", what):
            summary.output_error = _rel(run_model(ret_model, got[0]), y_orig)
    del ret_model, ret_state, caps  # hold at most ~3 models at once: original, pruned, a fresh init

    for tau, row in zip(taus, report.pruning, strict=True):
        state = retrieved_state(sf, k, tau)
        if orig_state is not None:
            num = sum(_norm(state[n].float() - orig_state[n].float()) ** 2 for n in sup)
            den = sum(_norm(orig_state[n].float()) ** 2 for n in sup)
            row.weight_error.append(math.sqrt(num / den) if den > 0 else None)
        else:
            row.weight_error.append(None)
        model = load_model(task, state, f"pruned context {k}") if task else None
        m = _metric(task, model, k) if model is not None else None
        row.metric.append(m[1] if m else None)
        row.output_error.append(
            _rel(run_model(model, got[0]), y_orig)
            if model is not None and y_orig is not None and got
            else None
        )
        del state, model

    if orig_state is not None:
        base_state, summary.same_budget_density = same_budget_state(orig_state, budget)
        if task is not None:
            base = load_model(task, base_state, f"pruned original {k}")
            m_base = _metric(task, base, k)
            summary.same_budget_metric = m_base[1] if m_base else None
            if y_orig is not None and got is not None:
                summary.same_budget_output_error = _rel(run_model(base, got[0]), y_orig)
    summary.winner = _winner(summary)


def _winner(s: ContextSummary) -> str | None:
    if s.retrieved_metric is not None and s.same_budget_metric is not None and s.metric_name:
        a, b = s.retrieved_metric, s.same_budget_metric
        if lower_is_better(s.metric_name):
            a, b = -a, -b
    elif s.output_error is not None and s.same_budget_output_error is not None:
        a, b = -s.output_error, -s.same_budget_output_error
    else:
        return None
    return "tie" if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) else ("psp" if a > b else "pruning")
