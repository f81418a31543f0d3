"""The architectures people merge, in the forms they save them: K=4 fine-tunes of one parent,
merged with the default policy, extracted, loaded back into the architecture, and the retrieved
outputs compared with the originals' against the merge's recorded prediction (Proposition 2 with
the η prior, summed over the superposed layers: `MergeReport.predicted_error`).

Tiny configs built here (nothing downloaded); torchvision's layouts come from tests/archs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pspctl.extract import extract
from pspctl.fileformat import SuperposedFile
from pspctl.merge import merge
from tests import hf_models as H
from tests.archs import mobilenet_v3_small, resnet18

K = 4


def _check(report, models, retrieved, x, *, tight: bool = True) -> list[float]:
    """Outputs of each retrieved model against its original: some error (something was
    superposed), within the error the merge predicted for that context."""
    assert any(d.role.value == "superposed" for d in report.decisions)
    errors = []
    for k in range(K):
        measured = H.rel(H.outputs(retrieved[k], x), H.outputs(models[k], x))
        errors.append(measured)
        assert measured > 0, k
        if tight:
            assert measured <= report.predicted_error[k], (k, measured, report.predicted_error[k])
    return errors


def _state_dicts(models, folder: Path) -> list[Path]:
    paths = []
    for k, model in enumerate(models):
        paths.append(folder / f"m{k}.pt")
        torch.save(model.state_dict(), paths[-1])
    return paths


def _load_state(build, path: Path):
    from safetensors.torch import load_file

    model = build().eval()
    model.load_state_dict(load_file(path), strict=True)
    return model


def test_resnet18_state_dicts(tmp_path):
    build, x = H.resnet()
    assert list(build().state_dict()) == list(resnet18().state_dict())  # torchvision's keys
    models = H.finetunes(build)
    report = merge(_state_dicts(models, tmp_path), tmp_path / "w.safetensors")
    retrieved = [
        _load_state(build, extract(tmp_path / "w.safetensors", k, tmp_path / f"r{k}.safetensors")[0])
        for k in range(K)
    ]
    _check(report, models, retrieved, x)


def test_mobilenet_v3_small_lightning_checkpoints(tmp_path):
    """Depthwise 3×3 and 5×5 convs (fan-in 9 and 25) and a Lightning `model.` prefix."""
    build, x = H.mobilenet()
    models = H.finetunes(build)
    paths = [H.save_lightning(m, tmp_path / f"m{k}.ckpt") for k, m in enumerate(models)]
    report = merge(paths, tmp_path / "w.safetensors")
    assert any("LightningModule attribute prefix 'model.'" in n for n in report.notes)
    written = extract(tmp_path / "w.safetensors", "all", tmp_path / "out")
    retrieved = [_load_state(build, p) for p in written]
    assert list(retrieved[0].state_dict()) == list(mobilenet_v3_small(10, width=0.25).state_dict())
    _check(report, models, retrieved, x)


def _hf_roundtrip(tmp_path, build, x, models, *, save=None, auto: str, tight: bool = True):
    """save_pretrained folders → merge → extract HF folders → from_pretrained, no key warnings."""
    import transformers

    paths = []
    for k, model in enumerate(models):
        paths.append(tmp_path / f"ft{k}")
        (save or (lambda m, p: m.save_pretrained(p)))(model, paths[-1])
    report = merge(paths, tmp_path / "w.safetensors")
    retrieved = []
    for path in extract(tmp_path / "w.safetensors", "all", tmp_path / "out"):
        model, info = getattr(transformers, auto).from_pretrained(path, output_loading_info=True)
        assert all(not v for v in info.values()), info
        retrieved.append(model.eval())
    return report, retrieved, _check(report, models, retrieved, x, tight=tight)


@pytest.mark.slow
def test_gpt2_hf_folders(tmp_path):
    build, x = H.gpt2()
    models = H.finetunes(build)
    report, retrieved, errors = _hf_roundtrip(tmp_path, build, x, models, auto="AutoModelForCausalLM")
    # config.json says gpt2: its Conv1D weights are [in, out] and are bound on dim 0.
    header = SuperposedFile(tmp_path / "w.safetensors").header
    assert header.tensors["transformer.h.0.attn.c_attn.weight"].fan_in_axis == 0
    # No task file: tune distils on made-up token ids, the student without dropout (GPT-2 has
    # 0.1), and moves each context towards its original.
    from pspctl.sources import require_task
    from pspctl.training import TuneOptions, tune

    sf = SuperposedFile(tmp_path / "w.safetensors")
    task = require_task(sf, None, "load_data")
    report = tune(sf, task, tmp_path / "t.safetensors", TuneOptions(steps=80, lr=1e-4))
    before = [r["output error"] for r in report.before]
    after = [r["output error"] for r in report.after]
    assert sum(after) < sum(before), (before, after)
    assert retrieved[0].config.n_embd == 32


@pytest.mark.slow
def test_llama_untied_sharded_folders(tmp_path):
    build, x = H.llama(tied=False)
    models = H.finetunes(build)
    report, retrieved, _ = _hf_roundtrip(
        tmp_path, build, x, models, save=lambda m, p: m.save_pretrained(p, max_shard_size="40KB"),
        auto="AutoModelForCausalLM",
    )  # fmt: skip
    assert (tmp_path / "ft0" / "model.safetensors.index.json").is_file()
    assert any("shards" in n for n in report.notes)
    assert not torch.equal(retrieved[0].lm_head.weight, retrieved[0].model.embed_tokens.weight)


@pytest.mark.slow
def test_llama_tied_folders_come_back_tied(tmp_path):
    build, x = H.llama(tied=True)
    models = H.finetunes(build)
    _, retrieved, errors = _hf_roundtrip(tmp_path, build, x, models, auto="AutoModelForCausalLM")
    for model in retrieved:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # save_pretrained kept one copy (no lm_head.weight): analyze builds the tied model from
    # config.json, loads it, and measures what extract gave back.
    from pspctl.analysis import analyze

    report = analyze(tmp_path / "w.safetensors", max_samples=8, sparsities=[0.5])
    assert all(c.output_error is not None and c.output_error > 0 for c in report.contexts)


@pytest.mark.slow
def test_bert_sequence_classification_state_dicts(tmp_path):
    build, x = H.bert()
    models = H.finetunes(build)
    report = merge(_state_dicts(models, tmp_path), tmp_path / "w.safetensors")
    written = extract(tmp_path / "w.safetensors", "all", tmp_path / "out")
    _check(report, models, [_load_state(build, p) for p in written], x)


@pytest.mark.slow
def test_vit_image_classification_folders(tmp_path):
    build, x = H.vit()
    models = H.finetunes(build)
    _hf_roundtrip(tmp_path, build, x, models, auto="AutoModelForImageClassification")
