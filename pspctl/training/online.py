"""`train`: the paper's online protocol (Section 7.1).

Context 0's data for `steps` steps, then context 1's, …, optionally for several cycles;
every `eval_every` steps and at the end of each block, every context's test metric. With
`baseline`, the same architecture without superposition follows the same schedule: the
paper's "standard" network, which forgets earlier tasks as it learns new ones.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pspctl.checkpoints import refuse_existing, save_state_dict
from pspctl.contexts import Kind
from pspctl.digests import record_task
from pspctl.errors import InputError
from pspctl.fileformat import check_output
from pspctl.nn import PSPModel, save, superpose
from pspctl.policy import Policy
from pspctl.task import Task, on_task_data, primary_metric
from pspctl.training.common import (
    Progress,
    batch_stream,
    check_steps,
    evaluate_all,
    guard,
    mean_primary,
    task_loss,
    write_json,
)
from pspctl.training.distributed import World

__all__ = ["TrainOptions", "TrainReport", "make_optimizer", "train"]


@dataclass(frozen=True)
class TrainOptions:
    num_contexts: int
    kind: Kind | str = Kind.BINARY
    steps: int = 500  # per context and cycle
    cycles: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"  # or "sgd" (momentum 0.9)
    eval_every: int = 0  # 0: only at the end of each block
    seed: int = 0
    baseline: bool = False
    mixture: bool = False
    policy: Policy = field(default_factory=Policy)
    labels: tuple[str, ...] | None = None
    task_spec: str | None = None  # recorded in the file
    command: str | None = None


@dataclass
class TrainReport:
    output: str
    metric: str
    evaluations: list[dict[str, Any]]  # {"step", "context" (being trained), "metrics": [per context]}
    final: list[dict[str, float]]
    steps: int
    wall_s: float
    options: dict[str, Any]

    @property
    def mean_final(self) -> float:
        return mean_primary(self.final)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_final"] = self.mean_final
        return out


def make_optimizer(params: Any, name: str, lr: float) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9. Raises InputError for any other name."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise InputError(f"--optimizer {name}: expected adam or sgd")


def _build(task: Task, options: TrainOptions) -> nn.Module:
    # Seed the model's initialisation without disturbing the caller's global RNG.
    with torch.random.fork_rng():
        torch.manual_seed(options.seed)
        model = task.build_model()
    if options.baseline:
        return model
    return superpose(
        model,
        options.num_contexts,
        kind=options.kind,
        seed=options.seed,
        policy=options.policy,
        mixture=options.mixture,
        labels=options.labels,
    )


def train(
    task: Task,
    output: str | Path | None,
    options: TrainOptions,
    *,
    metrics_path: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    world: World = World(),
) -> TrainReport:
    """Train K contexts in sequence and write the result; see the module docstring.

    The output (a pspctl file, or with `baseline` a plain state_dict) and the metrics JSON
    are rewritten at the end of every block, so an interrupted or diverged run leaves the
    last good pair behind. With `output=None` nothing is written (library use, benchmarks).

    Under torchrun pass `pspctl.training.distributed.launch()`'s world: every rank steps its
    share of each batch (DDP averages the gradients), and only rank 0 evaluates and writes;
    the other ranks' reports hold no evaluations.

    Raises:
        InputError: steps, cycles or contexts < 1.
        TaskError: the task has no load_data, or its data is empty.
        OutputError: the output exists without `force`.
        Diverged: the loss went NaN/Inf; the files of the last finished block are kept.
    """
    check_steps(options.steps)
    check_steps(options.cycles, "--cycles")
    check_steps(options.num_contexts, "--contexts")
    task.require("load_data")
    output = None if output is None else Path(output)

    def check_outputs() -> None:
        if output is not None and not options.baseline:
            check_output(output, force=force)  # a superposed file; the baseline writes a plain state_dict
        for path in (output, metrics_path):
            if path is not None:
                refuse_existing(path, force=force)

    world.on_main(check_outputs)  # only rank 0 writes (its file system may be its own)
    K = options.num_contexts
    model = _build(task, options).to(world.device)
    stepper = world.wrap(model)
    streams = [batch_stream(task, k, "train", options.seed) for k in range(K)]
    optimizer = make_optimizer(stepper.parameters(), options.optimizer, options.lr)
    total = options.steps * options.cycles * K
    recorded = {**asdict(options), "kind": Kind(options.kind).value, "policy": asdict(options.policy)}
    report = TrainReport(str(output or ""), "", [], [], 0, 0.0, recorded)
    start = time.perf_counter()

    def evaluate(step: int, context: int) -> None:
        report.steps = step

        def run() -> None:
            rows = evaluate_all(task, world.on_cpu(model), K)
            report.metric = report.metric or primary_metric(rows[0])[0]
            report.evaluations.append({"step": step, "context": context, "metrics": rows})
            report.final = rows

        world.on_main(run)

    kept = "nothing written (no block had finished)"
    evaluate(0, 0)
    step = 0
    model.train()
    for _ in range(options.cycles):
        for k in range(K):
            if isinstance(model, PSPModel):
                model.set_context(k)
            for _ in range(options.steps):
                (inputs, targets), rows = world.share(next(streams[k]))
                with on_task_data(task.source, f"load_data({k}, 'train')"):
                    loss = task_loss(stepper(inputs), targets, world, rows)
                step += 1
                guard(world.global_loss(loss), step, k, kept)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if progress:
                    progress(step, total, f"context {k}")
                if options.eval_every and step % options.eval_every == 0 and step % options.steps:
                    evaluate(step, k)
                    model.train()
            evaluate(step, k)
            model.train()
            report.wall_s = time.perf_counter() - start
            if output is not None:
                world.on_main(lambda: _write(world.on_cpu(model), output, report, metrics_path, options))
                kept = f"kept the last good file {output} (step {step})"
    return report


def _write(
    model: nn.Module,
    output: Path,
    report: TrainReport,
    metrics_path: str | Path | None,
    options: TrainOptions,
) -> None:
    if isinstance(model, PSPModel):
        save(
            model,
            output,
            force=True,
            recipe={"command": options.command, "train": report.options},
            task=record_task(options.task_spec, output),
            history=[{"step": "train", "steps": report.steps, "final": report.final}],
        )
    else:
        save_state_dict(model.state_dict(), output, force=True)
    if metrics_path is not None:
        write_json({"command": "train", **report.to_dict()}, metrics_path)
