"""Tiny real models, built inside the tests: an MLP and a CNN with BatchNorm."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn


def pytest_configure(config):
    """The tests' own list of trusted task files (pspctl.trust), never the user's: shared by
    the session (a module fixture's `merge --task` trusts its task for the tests using it)."""
    from pspctl.trust import ENV

    os.environ[ENV] = str(Path(tempfile.mkdtemp(prefix="pspctl-trust-")) / "trusted-tasks.json")


MLP_TASK = """
import torch
from tests.conftest import mlp

def build_model():
    return mlp(0)

def example_inputs():
    return (torch.randn(4, 16, generator=torch.Generator().manual_seed(0)),)

def load_data(context, split):
    gen = torch.Generator().manual_seed(context)
    x = torch.randn(32, 16, generator=gen)
    return [(x, (x[:, 0] > 0).long())]
"""  # a task file for `mlp`: write it beside the models as task.py


def mlp(seed: int, width: int = 48) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )  # fmt: skip
    model.train()
    model(torch.randn(4, 3, 4, 4))  # give BatchNorm non-trivial running statistics
    return model.eval()


def save_models(models: list[nn.Module], folder: Path, suffix: str = ".pt") -> list[Path]:
    from safetensors.torch import save_file

    paths = []
    for i, m in enumerate(models):
        path = folder / f"model{i}{suffix}"
        state = m.state_dict()
        if suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        paths.append(path)
    return paths


@pytest.fixture
def mlp_paths(tmp_path: Path) -> list[Path]:
    return save_models([mlp(i) for i in range(3)], tmp_path)


@pytest.fixture
def cnn_paths(tmp_path: Path) -> list[Path]:
    return save_models([cnn(i) for i in range(3)], tmp_path)
