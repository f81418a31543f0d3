"""Tied weights: one tensor under two names is stored once, decided once, and comes back tied;
a tied model saved once by save_pretrained loads where the task's model ties the missing key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pspctl.checkpoints import find_ties, open_checkpoint
from pspctl.extract import extract
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge

K = 3
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _llama_config(tie: bool = True):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie,
    )  # fmt: skip


def _llama(seed: int, tie: bool = True) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(_llama_config(tie)).eval()


def _fine_tunes(tmp_path: Path, *, folders: bool, tie: bool = True) -> tuple[list[Path], list[nn.Module]]:
    """K fine-tunes of one tiny Llama (parent + 2% noise per matrix), saved as state_dicts or folders."""
    parent = _llama(0, tie)
    models, paths = [], []
    for k in range(K):
        child = _llama(0, tie)
        torch.manual_seed(10 + k)
        with torch.no_grad():
            for p in child.parameters():
                if p.dim() > 1:
                    p.add_(0.02 * p.std() * torch.randn_like(p))
        assert torch.equal(child.model.embed_tokens.weight, child.lm_head.weight) == tie
        models.append(child)
        if folders:
            paths.append(tmp_path / f"ft{k}")
            child.save_pretrained(paths[-1])
        else:
            paths.append(tmp_path / f"ft{k}.pt")
            torch.save(child.state_dict(), paths[-1])
    del parent
    return paths, models


def _task(tmp_path: Path, tie: bool = True) -> Path:
    task = tmp_path / "llama_task.py"
    task.write_text(
        "import torch, transformers\n"
        "class Logits(transformers.LlamaForCausalLM):  # tune distils plain tensors\n"
        "    def forward(self, input_ids):\n"
        "        return super().forward(input_ids=input_ids).logits\n"
        "def build_model():\n"
        "    torch.manual_seed(1)\n"
        "    c = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,\n"
        f"        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings={tie},\n"
        "        use_cache=False)\n"
        "    return Logits(c).eval()\n"
        "def example_inputs():\n"
        "    return (torch.arange(16).reshape(2, 8) % 64,)\n"
        "def load_data(context, split):\n"
        "    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(context))\n"
        "    yield ids, ids\n"
        "def evaluate(model, context):\n"
        "    ids, _ = next(load_data(context, 'test'))\n"
        "    with torch.no_grad():\n"
        "        return {'accuracy': float((model(ids).argmax(-1) == ids).float().mean()) * 100}\n"
    )
    return task


def test_find_ties_groups_one_storage():
    lin = nn.Linear(4, 4)
    state = {"a.weight": lin.weight, "b": torch.zeros(3), "c.weight": lin.weight, "d": lin.weight[:2]}
    assert find_ties(state) == {"c.weight": "a.weight"}  # a view with another layout is not a tie
    assert find_ties({"lm_head.weight": lin.weight, "wte.weight": lin.weight}) == {
        "lm_head.weight": "wte.weight"
    }


def test_tied_state_dict_is_stored_once_and_comes_back_tied(tmp_path: Path):
    paths, models = _fine_tunes(tmp_path, folders=False)
    ckpt = open_checkpoint(paths[0])
    assert ckpt.ties == {HEAD: EMBED} and HEAD not in ckpt.infos
    out = tmp_path / "w.safetensors"
    report = merge(paths, out, MergeOptions())
    # One decision, one role: the tensor is listed once, under the embedding's name.
    assert [d.name for d in report.decisions].count(EMBED) == 1
    assert HEAD not in [d.name for d in report.decisions]
    # The storage ratio counts it once, as the inputs store it once.
    unique = sum(p.numel() * p.element_size() for p in models[0].parameters())  # parameters() dedups
    assert report.input_bytes == K * unique
    sf = SuperposedFile(out)
    assert sf.header.tied == {HEAD: EMBED}
    ids = torch.arange(16).reshape(2, 8) % 64
    for k in range(K):
        extracted = extract(out, k, tmp_path / f"out{k}.pt", fmt="pt")[0]
        state = torch.load(extracted, weights_only=True)
        assert state[HEAD].data_ptr() == state[EMBED].data_ptr()  # saved shared
        model = _llama(5)
        model.load_state_dict(state)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still one parameter
        # The shared parameter is not corrupted: it is the tensor the file keeps for it.
        assert torch.equal(model.model.embed_tokens.weight, sf.retrieve(EMBED, k))
        if sf.metas[EMBED].role != "superposed":
            assert torch.equal(model.model.embed_tokens.weight, models[k].model.embed_tokens.weight)
        with torch.no_grad():
            want, got = models[k](ids).logits, model(ids).logits
        error = float((got - want).norm() / want.norm())
        assert error <= 2 * report.predicted_error[k] + 1e-5, (k, error, report.predicted_error[k])


def test_nn_load_ties_the_shared_binding(tmp_path: Path):
    from pspctl.nn import load, save

    paths, models = _fine_tunes(tmp_path, folders=False)
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions())
    sf = SuperposedFile(out)
    psp = load(sf, _llama(5))
    assert psp.tensors[HEAD] is psp.tensors[EMBED]
    ids = torch.arange(16).reshape(2, 8) % 64
    for k in range(K):
        ref = _llama(5)
        ref.load_state_dict(sf.state_dict(k))
        with torch.no_grad(), psp.context(k):
            assert torch.allclose(psp(ids).logits, ref(ids).logits, atol=1e-5)
    save(psp, tmp_path / "again.safetensors")
    again = SuperposedFile(tmp_path / "again.safetensors")
    assert again.header.tied == {HEAD: EMBED} and HEAD not in again.metas


def test_untied_llama_keeps_two_tensors(tmp_path: Path):
    paths, _ = _fine_tunes(tmp_path, folders=False, tie=False)
    merge(paths, tmp_path / "w.safetensors", MergeOptions())
    sf = SuperposedFile(tmp_path / "w.safetensors")
    assert sf.header.tied == {} and HEAD in sf.metas


def test_ties_not_in_every_input_are_untied(tmp_path: Path):
    paths, _ = _fine_tunes(tmp_path, folders=False)
    untied = _llama(3, tie=False)
    torch.save(untied.state_dict(), tmp_path / "untied.pt")
    merge([*paths[:2], tmp_path / "untied.pt"], tmp_path / "w.safetensors", MergeOptions())
    sf = SuperposedFile(tmp_path / "w.safetensors")
    assert sf.header.tied == {} and HEAD in sf.metas
    for k, path in enumerate([*paths[:2], tmp_path / "untied.pt"]):
        original = torch.load(path, weights_only=True)
        assert sf.retrieve(HEAD, k).shape == original[HEAD].shape


@pytest.mark.parametrize("command", ["analyze", pytest.param("export", marks=pytest.mark.slow), "tune"])
def test_save_pretrained_folders_of_a_tied_model_load(tmp_path: Path, command: str):
    """save_pretrained keeps one copy (no lm_head.weight): the task's tied model loads it."""
    from typer.testing import CliRunner

    from pspctl.cli import app

    paths, models = _fine_tunes(tmp_path, folders=True)
    out = tmp_path / "w.safetensors"
    task = _task(tmp_path)
    merge(paths, out, MergeOptions(task=str(task)))
    sf = SuperposedFile(out)
    assert HEAD not in sf.shapes()
    from pspctl.task import load_model, load_task

    loaded = load_model(load_task(str(task)), sf.state_dict(0), "context 0")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, sf.retrieve(EMBED, 0))
    args = {
        "analyze": ["analyze", str(out), "--task", str(task), "--json", str(tmp_path / "a.json")],
        "export": ["export", str(out), "--task", str(task), "--context", "0", "-o", str(tmp_path / "m.onnx")],
        "tune": [
            "tune",
            str(out),
            "--task",
            str(task),
            "-o",
            str(tmp_path / "t.safetensors"),
            "--steps",
            "1",
        ],
    }[command]
    if command == "export":
        pytest.importorskip("onnx")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    if command == "tune":  # distilled from the folders; the head stays tied, stored once
        tuned = SuperposedFile(tmp_path / "t.safetensors")
        assert HEAD not in tuned.shapes()
        again = load_model(load_task(str(task)), tuned.state_dict(1), "tuned context 1")
        assert again.lm_head.weight is again.model.embed_tokens.weight


def test_gpt2_tied_state_dict_round_trip(tmp_path: Path):
    """GPT-2 ties lm_head.weight to transformer.wte.weight; its Conv1D weights are bound on dim 0."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, use_cache=False
    )
    torch.manual_seed(0)
    parent = transformers.GPT2LMHeadModel(config).eval()
    models, paths = [], []
    for k in range(K):
        child = transformers.GPT2LMHeadModel(config).eval()
        child.load_state_dict(parent.state_dict())
        torch.manual_seed(20 + k)
        with torch.no_grad():
            for p in child.parameters():
                if p.dim() > 1:
                    p.add_(0.02 * p.std() * torch.randn_like(p))
        models.append(child)
        paths.append(tmp_path / f"gpt{k}.pt")
        torch.save(child.state_dict(), paths[-1])
    out = tmp_path / "w.safetensors"
    report = merge(paths, out, MergeOptions(fan_in_axes=(("*.c_*.weight", 0),)))
    sf = SuperposedFile(out)
    assert sf.header.tied == {"lm_head.weight": "transformer.wte.weight"}
    ids = torch.arange(12).reshape(2, 6) % 50
    for k in range(K):
        state = sf.state_dict(k)
        model = transformers.GPT2LMHeadModel(config).eval()
        model.load_state_dict(state)
        assert model.lm_head.weight is model.transformer.wte.weight
        assert torch.equal(model.transformer.wte.weight, sf.retrieve("transformer.wte.weight", k))
        with torch.no_grad():
            want, got = models[k](ids).logits, model(ids).logits
        error = float((got - want).norm() / want.norm())
        assert error <= 2 * report.predicted_error[k] + 1e-5, (k, error, report.predicted_error[k])


def test_a_base_follows_the_inputs_ties(tmp_path: Path):
    paths, models = _fine_tunes(tmp_path, folders=False)
    untied_parent = {k: v.clone() for k, v in _llama(0).state_dict().items()}  # clones: not tied
    torch.save(untied_parent, tmp_path / "parent.pt")
    report = merge(paths, tmp_path / "w.safetensors", MergeOptions(base=str(tmp_path / "parent.pt")))
    sf = SuperposedFile(tmp_path / "w.safetensors")
    assert sf.header.tied == {HEAD: EMBED} and report.base is not None
    for k in range(K):
        if sf.metas[EMBED].role != "superposed":
            assert torch.equal(sf.state_dict(k)[HEAD], models[k].lm_head.weight)
