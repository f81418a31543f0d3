"""`tune`: heal a post-hoc merge by training the superposed file itself, one context at a time.

Superposed weights and per-context tensors are trainable; minibatches go round-robin over
the contexts. `distill` matches each original model's outputs on its own context's inputs
(no labels needed); `task` uses the task loss on the labels.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pspctl.digests import INDEX_SUFFIX, rebase, record_path, record_task, sha256_checkpoint
from pspctl.errors import InputError, OutputError
from pspctl.fileformat import SuperposedFile, check_output, open_superposed
from pspctl.nn import PSPModel, load, save
from pspctl.sources import files_read, locate_originals, open_originals
from pspctl.task import (
    Task,
    as_tensor,
    check_fits,
    load_model,
    lower_is_better,
    on_task_data,
    primary_metric,
)
from pspctl.training.common import (
    Progress,
    batch_stream,
    check_steps,
    evaluate_all,
    guard,
    mean_primary,
    mse,
    task_loss,
)
from pspctl.training.distributed import World
from pspctl.training.online import make_optimizer
from pspctl.types import Objective

__all__ = ["OBJECTIVES", "TuneOptions", "TuneReport", "default_output", "tune"]

OBJECTIVES = tuple(o.value for o in Objective)
# Without --lr: the first of these after which the mean metric is not worse than the input's.
# 1e-4 suits the MLPs and CNNs measured; a tiny ViT or a BERT fine-tune merge overshoots at
# it from the first Adam step (every entry moves by lr, whatever the gradient's scale).
AUTO_LRS = (1e-4, 1e-5, 1e-6)


@dataclass(frozen=True)
class TuneOptions:
    steps: int = 200
    objective: str = "auto"  # distill when every original checkpoint is available, else task
    lr: float | None = None  # None: AUTO_LRS, lowered while the result is worse than the input
    optimizer: str = "adam"
    eval_every: int = 0  # 0: before and after only
    seed: int = 0
    task_spec: str | None = None
    command: str | None = None


@dataclass
class TuneReport:
    input: str
    output: str
    objective: str
    metric: str
    before: list[dict[str, float]]
    after: list[dict[str, float]]
    originals: list[dict[str, float]] | None  # the individual models, when available
    curve: list[dict[str, Any]] = field(default_factory=list)  # {"step", "metrics"}
    steps: int = 0
    wall_s: float = 0.0
    warnings: list[str] = field(default_factory=list)  # e.g. the tuned file is worse
    lr: float = 0.0  # the learning rate of the file written
    tried: list[dict[str, Any]] = field(default_factory=list)  # {"lr", "mean_after", "worse"}, in order
    notes: list[str] = field(default_factory=list)  # e.g. a lower lr was used

    @property
    def worse(self) -> bool:
        """Whether tuning made the mean primary metric worse (lower, or higher for a loss or
        an error): too large a learning rate does, and the file is written all the same."""
        if not self.before or not self.after:  # a rank other than 0 measures nothing
            return False
        return self.is_worse(mean_primary(self.after))

    def is_worse(self, after: float, than: float | None = None) -> bool:
        """Whether a mean primary metric `after` is worse than `than` (default: before tuning)."""
        before = mean_primary(self.before) if than is None else than
        if math.isclose(before, after, rel_tol=1e-9, abs_tol=1e-12):
            return False
        return after > before if lower_is_better(self.metric) else after < before

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_before"], out["mean_after"] = mean_primary(self.before), mean_primary(self.after)
        out["mean_originals"] = mean_primary(self.originals) if self.originals else None
        out["worse"] = self.worse
        return out


def default_output(path: str | Path) -> Path:
    """`<stem>.tuned.safetensors` beside the superposed file `path` (`w.safetensors` or its
    shard index `w.safetensors.index.json` → `w.tuned.safetensors`); for a folder holding
    one, `<folder>.tuned.safetensors` beside the folder, which a second file inside would
    make ambiguous to every command reading the folder."""
    path = Path(path)
    if path.is_dir():
        return path.with_name(f"{path.name}.tuned.safetensors")
    name = path.name.removesuffix(INDEX_SUFFIX)
    return path.with_name(f"{name.removesuffix('.safetensors')}.tuned.safetensors")


def _teachers(file: SuperposedFile, task: Task, objective: str, trust_pickle: bool) -> list[nn.Module] | None:
    """The original models for distillation, or None when `objective` is task / they are gone.

    They are found as analyze finds them (pspctl.sources): as recorded, then beside the file.
    """
    if objective == "task":
        return None
    located = locate_originals(file)
    problem = None
    if not located.recorded:
        problem = "the file records no input checkpoints"
    elif located.missing:
        problem = f"original {located.missing[0]} not found"
    elif located.changed:
        problem = f"original {located.changed[0]} changed since the merge (sha256 differs)"
    if problem:
        if objective == "distill":
            raise InputError(
                f"--objective distill needs the original models: {problem}; use --objective task"
            )
        return None
    return [
        load_model(task, {n: ckpt[n] for n in ckpt.names}, str(ckpt.path))
        for ckpt in open_originals(located.paths, trust_pickle=trust_pickle)
    ]


def _unlabelled(task: Task) -> bool:
    """Whether the task's training batches carry no targets, `(inputs, None)`. Looks at the
    first batch only (load_data is iterated lazily), not at all of context 0's data again."""
    if task.load_data is None:
        return False
    batch = next(iter(task.load_data(0, "train")), None)
    return isinstance(batch, (tuple, list)) and len(batch) == 2 and batch[1] is None


def _agreement(task: Task, teachers: Sequence[nn.Module]) -> Callable[[nn.Module, int], dict[str, float]]:
    """An `evaluate` for unlabelled data: how often the model's top output agrees with its
    original's on the test inputs (%), and the relative output error against it."""

    def evaluate(model: nn.Module, k: int) -> dict[str, float]:
        same = total = 0
        err_sq = ref_sq = 0.0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for inputs, _ in task.batches(k, "test"):
                    out = as_tensor(model(inputs)).float()
                    ref = as_tensor(teachers[k].eval()(inputs)).float()
                    same += int((out.argmax(-1) == ref.argmax(-1)).sum())
                    total += ref.argmax(-1).numel()
                    err_sq += float((out - ref).pow(2).sum())
                    ref_sq += float(ref.pow(2).sum())
        finally:
            model.train(was_training)
        return {
            "agreement": 100.0 * same / max(total, 1),
            "output error": math.sqrt(err_sq / max(ref_sq, 1e-30)),
        }

    return evaluate


def tune(
    path: str | Path | SuperposedFile,
    task: Task,
    output: str | Path,
    options: TuneOptions = TuneOptions(),
    *,
    force: bool = False,
    trust_pickle: bool = False,
    progress: Progress | None = None,
    world: World = World(),
    max_shard_size: int | str | None = None,
) -> TuneReport:
    """Fine-tune a superposed file and write the result to `output` (never to `path`).

    `trust_pickle` lets the original checkpoints (the distillation teachers) be pickled
    modules, as merge's option of that name: loading them runs code from the files.

    Under torchrun pass `pspctl.training.distributed.launch()`'s world: every rank steps its
    share of each batch (DDP averages the gradients); rank 0 evaluates and writes, and the
    other ranks' reports hold no metrics.

    Raises:
        InputError: steps < 1, unknown objective, distill without the originals.
        UnsafeCheckpointError: an original is a pickled module, without `trust_pickle`.
        TaskError: no load_data.
        MismatchError: the task's model does not fit the file.
        OutputError: output is the input, or exists without `force`.
        Diverged: the loss went NaN/Inf; nothing is written and the input is untouched.
    """
    check_steps(options.steps)
    if options.objective not in OBJECTIVES:
        raise InputError(f"--objective {options.objective}: expected {', '.join(OBJECTIVES)}")
    file = open_superposed(path)
    output = Path(output)

    def check_outputs() -> None:
        if output.exists() and os.path.samefile(output, file.path):  # also through a link
            raise OutputError(f"{output}: tune never overwrites its input; choose another -o")
        check_output(output, force=force, inputs=files_read(file, task=task.source))

    world.on_main(check_outputs)  # only rank 0 writes (its file system may be its own)
    task.require("load_data")

    def fresh() -> PSPModel:
        with torch.random.fork_rng():
            torch.manual_seed(options.seed)
            model = task.build_model()
            check_fits(model, file.shapes(), str(file.path))  # so the error names the task's model
            return load(file, model)  # (which checks again, for library callers: a state_dict walk)

    psp = fresh()
    teachers = _teachers(file, task, options.objective, trust_pickle)
    unlabelled = _unlabelled(task)
    if unlabelled:  # made-up inputs (a Hugging Face model without a task file)
        if not teachers:
            raise InputError(
                f"{file.path}: its data has no labels (inputs made up from config.json), so tune can "
                "only distil, and the original models were not found; pass --task with load_data"
            )
        task = replace(task, evaluate=_agreement(task, teachers))
    objective = "distill" if teachers else "task"
    K = file.num_contexts
    report = TuneReport(str(file.path), str(output), objective, "", [], [], None)

    def evaluate(model: PSPModel, step: int, curve: list[dict[str, Any]]) -> list[dict[str, float]] | None:
        rows = world.on_main(lambda: evaluate_all(task, world.on_cpu(model), K))
        if rows is not None:
            curve.append({"step": step, "metrics": rows})
        return rows

    def evaluate_originals() -> None:
        report.metric = primary_metric(report.before[0])[0]
        report.originals = [task.metric(teachers[k], k) for k in range(K)] if teachers else None

    report.before = evaluate(psp, 0, report.curve) or []
    world.on_main(evaluate_originals)
    for teacher in teachers or []:
        teacher.to(world.device)

    def attempt(psp: PSPModel, lr: float, curve: list[dict[str, Any]]) -> list[dict[str, float]]:
        """Train `psp` for the steps at `lr`; its metrics after (rank 0; [] elsewhere)."""
        psp.to(world.device)
        stepper = world.wrap(psp)
        streams = [batch_stream(task, k, "train", options.seed) for k in range(K)]
        optimizer = make_optimizer(stepper.parameters(), options.optimizer, lr)
        # Distilling on made-up inputs, the student runs as the teacher does (no dropout): the
        # targets are the teacher's outputs, and dropout's noise only pulls the student off them.
        psp.train(not unlabelled)
        for step in range(1, options.steps + 1):
            k = (step - 1) % K
            psp.set_context(k)
            (inputs, targets), rows = world.share(next(streams[k]))
            with on_task_data(task.source, f"load_data({k}, 'train')"):
                # A Hugging Face model returns its logits in a ModelOutput.
                outputs = as_tensor(stepper(inputs))
                if teachers:
                    with torch.no_grad():
                        reference = as_tensor(teachers[k](inputs))
                    loss = mse(outputs, reference, world, rows)
                else:
                    loss = task_loss(outputs, targets, world, rows)
            guard(world.global_loss(loss), step, k, f"nothing written; {file.path} is unchanged")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress:
                progress(step, options.steps, f"context {k}, lr {lr:g}")
            if options.eval_every and step % options.eval_every == 0 and step != options.steps:
                evaluate(psp, step, curve)
                psp.train(not unlabelled)
        return evaluate(psp, options.steps, curve) or []

    # Each learning rate starts from the file; the first not worse than the input is kept, else
    # the least bad. Rank 0 judges; every rank follows its verdict.
    start = time.perf_counter()
    kept: tuple[PSPModel, list[dict[str, float]], list[dict[str, Any]], float] | None = None
    first_curve = list(report.curve)
    for i, lr in enumerate(AUTO_LRS if options.lr is None else (options.lr,)):
        model = psp if i == 0 else fresh()
        curve = list(first_curve)
        after = attempt(model, lr, curve)

        def verdict(
            after: list[dict[str, float]] = after, best: list[dict[str, float]] | None = kept and kept[1]
        ) -> tuple[float, bool, bool]:
            mean = mean_primary(after)
            better = best is None or report.is_worse(mean_primary(best), than=mean)
            return mean, report.is_worse(mean), better

        mean_after, worse, better = world.from_main(verdict)
        report.tried.append({"lr": lr, "mean_after": mean_after, "worse": worse})
        if better:
            kept = (model, after, curve, lr)
        if not worse:
            break
    assert kept is not None
    psp, report.after, report.curve, report.lr = kept
    report.wall_s = time.perf_counter() - start
    report.steps = options.steps

    def write() -> None:
        hf = file.header.hf  # a merge of HF folders: extract still writes model folders
        task = file.header.task  # a .py path: recorded relative to the output, as merge does
        if task is None:
            task = record_task(options.task_spec, output)
        elif task.endswith(".py"):
            task = rebase(task, file.path, output)
        model = world.on_cpu(psp)
        if model.base and model.base.get("path"):  # a linked base: where it was read (--base PATH)
            given = file.base_given
            path = (
                rebase(model.base["path"], file.path, output) if given is None else record_path(given, output)
            )
            model.base = {**model.base, "path": path}
        record = {
            "step": "tune",
            "input": str(file.path),
            "input_sha256": sha256_checkpoint(file.path),
            **asdict(options),
            "lr": report.lr,
            "lr_tried": [t["lr"] for t in report.tried],
            "objective": objective,
            "mean_before": mean_primary(report.before),
            "mean_after": mean_primary(report.after),
            "wall_s": round(report.wall_s, 3),
        }
        save(
            model,
            output,
            force=force,
            recipe=file.header.recipe,
            task=task,
            inputs=[{**i, "path": rebase(i["path"], file.path, output)} for i in file.header.inputs],
            history=[*file.header.history, record],
            max_shard_size=max_shard_size,
            hf=None if hf is None else {**hf, "source": rebase(hf["source"], file.path, output)},
            files=file.stored_files() if hf else None,
        )

    world.on_main(write)
    _explain(report, file.path, output, options.lr)
    return report


def _explain(report: TuneReport, source: Path, output: Path, lr: float | None) -> None:
    """The report's notes and warnings about the learning rate and a worse result."""
    if not report.before:  # a rank other than 0 measures nothing
        return
    m = report.metric
    before = mean_primary(report.before)
    if lr is None and len(report.tried) > 1:
        for t, then in itertools.pairwise(report.tried):
            report.notes.append(
                f"lr {t['lr']:g} made the merge worse (mean {m} {before:.4g} → {t['mean_after']:.4g}); "
                f"tried lr {then['lr']:g} from the file again"
            )
    if not report.worse:
        return
    after = mean_primary(report.after)
    if lr is None:
        tried = ", ".join(f"{t['lr']:g}" for t in report.tried)
        report.warnings.append(
            f"{output} is worse than its input {source} at every lr tried ({tried}): mean {m} "
            f"{before:.4g} → {after:.4g} at lr {report.lr:g}, the least bad; it was written anyway"
        )
    else:
        report.warnings.append(
            f"{output} is worse than its input {source}: mean {m} {before:.4g} → {after:.4g}; it was "
            f"written anyway. Try a lower --lr (e.g. {lr / 10:.2g}, a tenth of {lr:g})"
        )
