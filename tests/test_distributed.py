"""Training beyond one process: 2 ranks over gloo against 1 process, same global batch and seed.

`pspctl train` and `pspctl tune` run under torchrun (the real entry point, `-m pspctl`), and
`pspctl.nn` models train under DDP and FSDP2 (`fully_shard`) through torch.multiprocessing:
each writes a superposed file that must equal the one-process file within float tolerance.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pspctl.cli import app
from pspctl.errors import InputError, OutputError
from pspctl.fileformat import SuperposedFile
from pspctl.nn import PSPModel, save, superpose
from pspctl.policy import Policy
from pspctl.training.common import task_loss
from pspctl.training.distributed import RankFailed, World

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")

# Batches of 33 rows: 2 ranks get 17 and 16, so the loss must be the mean over the global
# batch (not the mean of the ranks' means) for the runs to agree.
TASK = """
import torch
from torch import nn


def build_model():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def load_data(context, split):
    gen = torch.Generator().manual_seed(100 * context + (split == "test"))
    x = torch.randn(99, 8, generator=gen)
    y = (x @ torch.randn(8, 3, generator=torch.Generator().manual_seed(context))).argmax(1)
    return [(x[i : i + 33], y[i : i + 33]) for i in range(0, 99, 33)]
"""

ALL_WEIGHTS = ("--superpose", "0.weight", "--superpose", "2.weight")


def torchrun(folder: Path, *args: str, entry_point: bool = False) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node 2 -m pspctl ARGS` in `folder` (gloo: no GPU is used).

    With `entry_point`, the installed script instead: `torchrun --no-python pspctl ARGS`.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = Path(sys.executable).with_name("pspctl")
    program = ["--no-python", str(script)] if entry_point and script.exists() else ["-m", "pspctl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [*command, *program, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )


def one_process(folder: Path, *args: str) -> None:
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output


def assert_same_file(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Every context's retrieved weights, and the stored superposed tensors, agree."""
    fa, fb = SuperposedFile(a), SuperposedFile(b)
    assert fa.names() == fb.names() and fa.num_contexts == fb.num_contexts
    assert [fa.header.tensors[n].role for n in fa.names()] == [fb.header.tensors[n].role for n in fb.names()]
    for k in range(fa.num_contexts):
        sa, sb = fa.state_dict(k), fb.state_dict(k)
        for name in sa:
            torch.testing.assert_close(sa[name], sb[name], atol=atol, rtol=0)


def test_train_and_tune_under_torchrun_match_one_process(tmp_path):
    (tmp_path / "task.py").write_text(TASK)
    train = ["train", "--task", "task.py", "-k", "2", "--steps", "4", "--kind", "complex", *ALL_WEIGHTS]
    one_process(tmp_path, *train, "-o", "one.safetensors", "-q")
    run = torchrun(tmp_path, *train, "-o", "two.safetensors", "-q", "--eval-every", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote two.safetensors") == 1  # rank 0 alone prints
    assert_same_file(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    one = json.loads((tmp_path / "one.metrics.json").read_text())
    two = json.loads((tmp_path / "two.metrics.json").read_text())
    assert one["final"] == two["final"] and two["steps"] == 8
    assert SuperposedFile(tmp_path / "one.safetensors").header.tensors["0.weight"].role == "superposed"

    tune = ["tune", "one.safetensors", "--task", "task.py", "--objective", "task", "--steps", "6"]
    tune += ["--lr", "1e-2"]
    one_process(tmp_path, *tune, "-o", "tuned1.safetensors", "-q")
    run = torchrun(tmp_path, *tune, "-o", "tuned2.safetensors", "-q", entry_point=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_file(tmp_path / "tuned1.safetensors", tmp_path / "tuned2.safetensors")
    tuned = SuperposedFile(tmp_path / "tuned2.safetensors").state_dict(0)["2.weight"]
    assert not torch.allclose(tuned, SuperposedFile(tmp_path / "one.safetensors").state_dict(0)["2.weight"])

    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


# pspctl.nn directly, under DDP and FSDP2, through torch.multiprocessing.

KINDS = ("binary", "complex", "onepower", "rotation")


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(24, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)
    )


def make_psp(kind: str) -> PSPModel:
    policy = Policy(superpose=("0.weight", "2.weight", "5.weight"), max_error=math.inf)
    return superpose(build(), 3, kind=kind, policy=policy)


def steps(psp: PSPModel, stepper: nn.Module, world: World, n: int = 4) -> torch.optim.Optimizer:
    """Adam on contexts 0 and 1 in turn (context 2 never trains), 9 rows a batch (5 + 4 over 2 ranks)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 2, 8, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    optimizer = torch.optim.Adam(stepper.parameters(), lr=1e-2)
    for s in range(n):
        psp.set_context(s % 2)
        (xs, ys), rows = world.share((x + s, y))
        loss = task_loss(stepper(xs), ys, world, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return optimizer


def _worker(rank: int, port: int, folder: str) -> None:
    out = Path(folder)
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
        world = World(rank, 2)
        found: dict[str, object] = {}
        for kind in KINDS:
            psp = make_psp(kind)
            optimizer = steps(psp, world.wrap(psp), world)
            found[f"ddp-{kind}-untouched"] = sum(
                p.grad is None and p not in optimizer.state for p in psp.parameters()
            )
            world.on_main(lambda psp=psp, kind=kind: save(psp, out / f"ddp-{kind}.safetensors"))
        from torch.distributed.fsdp import fully_shard

        for kind in KINDS:
            psp = make_psp(kind)
            for layer in psp.module:
                if next(layer.parameters(), None) is not None:
                    fully_shard(layer)
            fully_shard(psp)
            found[f"fsdp-{kind}-sharded"] = all(hasattr(p, "full_tensor") for p in psp.parameters())
            optimizer = steps(psp, psp, world)
            found[f"fsdp-{kind}-untouched"] = sum(
                p.grad is None and p not in optimizer.state for p in psp.parameters()
            )
            save(psp, out / f"fsdp-{kind}.safetensors")  # every rank gathers; rank 0 writes
        try:
            world.on_main(lambda: (_ for _ in ()).throw(OutputError("disk full")))
        except RankFailed as exc:
            found["failed"] = [str(exc), exc.exit_code]
        except OutputError as exc:
            found["failed"] = [str(exc), exc.exit_code]
        torch.distributed.destroy_process_group()
        (out / f"rank{rank}.json").write_text(json.dumps(found))
    except Exception:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nn_models_under_ddp_and_fsdp2_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    errors = [p.read_text() for p in tmp_path.glob("*.error")]
    assert not errors, errors[0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for kind in KINDS:
        psp = make_psp(kind)
        optimizer = steps(psp, psp, World())
        save(psp, tmp_path / f"one-{kind}.safetensors")
        assert_same_file(tmp_path / f"one-{kind}.safetensors", tmp_path / f"ddp-{kind}.safetensors")
        # context 2's per-context copies: no gradient and no optimizer state, as in one process
        untouched = sum(p.grad is None and p not in optimizer.state for p in psp.parameters())
        assert untouched > 0 and ranks[0][f"ddp-{kind}-untouched"] == untouched
        assert ranks[0][f"fsdp-{kind}-untouched"] == untouched
        assert ranks[0][f"fsdp-{kind}-sharded"] and ranks[1][f"fsdp-{kind}-sharded"]
        assert_same_file(tmp_path / f"one-{kind}.safetensors", tmp_path / f"fsdp-{kind}.safetensors")
    assert ranks[0]["failed"] == ["disk full", 8]
    assert ranks[1]["failed"] == ["rank 0 failed: disk full", 8]


def test_share_splits_one_global_batch_and_the_loss_is_its_mean():
    x, y = torch.arange(33.0).reshape(11, 3), torch.arange(11) % 3
    shares = [World(rank, 2).share(({"x": x}, y)) for rank in range(2)]
    assert [s[1] for s in shares] == [11, 11]
    assert torch.equal(torch.cat([s[0][0]["x"] for s in shares]), x)  # contiguous, 6 + 5 rows
    assert [len(s[0][1]) for s in shares] == [6, 5]
    logits = torch.randn(11, 3, generator=torch.Generator().manual_seed(0))
    parts = [task_loss(logits[:6], y[:6], World(0, 2), 11), task_loss(logits[6:], y[6:], World(1, 2), 11)]
    # DDP averages over the ranks: the average is the mean over all 11 rows, not of the two means
    torch.testing.assert_close((parts[0] + parts[1]) / 2, task_loss(logits, y))
    targets = torch.randn(11, 3)
    parts = [
        task_loss(logits[:6], targets[:6], World(0, 2), 11),
        task_loss(logits[6:], targets[6:], World(1, 2), 11),
    ]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, task_loss(logits, targets))
    with pytest.raises(InputError, match="batch of 1 rows cannot be split over 2 processes"):
        World(0, 2).share((x[:1], y[:1]))


def test_launch_on_gpus_takes_nccl_and_the_local_rank_s_device(monkeypatch):
    """The nccl path, with CUDA and the process group stubbed (no GPU here): the backend, the
    device cuda:LOCAL_RANK and DDP's device_ids follow from torchrun's variables; the group is
    torn down after a barrier."""
    import torch.distributed as dist
    import torch.nn.parallel

    from pspctl.training.distributed import launch

    calls: list[tuple] = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append(("barrier",)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, **kw: ("ddp", model, kw))
    model = nn.Linear(2, 2)
    with launch(timeout_s=60) as world:
        assert (world.rank, world.size, world.device) == (3, 4, torch.device("cuda", 1))
        assert not world.main and world.grouped
        wrapped = world.wrap(model)
        copy = world.on_cpu(model)
    assert wrapped[1] is model and wrapped[2]["device_ids"] == [1]
    assert copy is not model and torch.equal(copy.weight, model.weight)
    assert calls[0] == ("set_device", torch.device("cuda", 1))
    backend, kw = calls[1][1], calls[1][2]
    assert backend == "nccl" and (kw["rank"], kw["world_size"]) == (3, 4)
    assert kw["timeout"].total_seconds() == 60
    assert calls[2:] == [("barrier",), ("destroy",)]
