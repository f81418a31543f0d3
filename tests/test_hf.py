"""Hugging Face folders in and out (pspctl.hf): what merge records, the folders extract writes,
HF models without a task file, and the other containers (Lightning, timm)."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pspctl.checkpoints import open_checkpoint
from pspctl.cli import app
from pspctl.errors import InputError, MismatchError, PspctlError
from pspctl.extract import extract
from pspctl.fileformat import SuperposedFile
from pspctl.merge import merge
from tests import hf_models as H

pytest.importorskip("transformers")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    """Four HF fine-tunes of a tiny Llama, each a save_pretrained folder with its tokenizer."""
    folder = tmp_path_factory.mktemp("hf")
    build, x = H.llama(tied=False)
    models = H.finetunes(build)
    tok = H.tokenizer()
    paths = []
    for k, model in enumerate(models):
        path = folder / f"ft{k}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        (path / "README.md").write_text("the input's own card")
        paths.append(path)
    merge(paths, folder / "w.safetensors")
    return folder, paths, models, x


def test_merge_records_and_stores_the_first_folders_non_weight_files(finetunes):
    folder, paths, _, _ = finetunes
    sf = SuperposedFile(folder / "w.safetensors")
    records = {f["name"]: f for f in sf.header.hf["files"]}
    expected = sorted(
        p.name for p in paths[0].iterdir() if p.suffix != ".safetensors" and p.name != "README.md"
    )
    assert sorted(records) == expected and "config.json" in records and "tokenizer.json" in records
    for name, record in records.items():
        data = (paths[0] / name).read_bytes()
        assert record == {
            "name": name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "stored": True,
        }
        assert sf.file(name) == data
    assert sf.header.hf["source"] == str(paths[0]) and len(sf.header.hf["predicted_error"]) == 4


def test_info_shows_the_recorded_folder(finetunes):
    folder, paths, _, _ = finetunes
    result = run("info", folder / "w.safetensors")
    assert result.exit_code == 0
    assert f"Hugging Face folders: 4 non-weight files of {paths[0]} recorded, 4 stored" in " ".join(
        result.output.split()
    )


def test_readme_flow_extract_context_loads_with_from_pretrained_and_its_tokenizer(finetunes, tmp_path):
    """The issue's "done means": merge four fine-tunes, extract --context 2 -o model2/, load it."""
    import transformers

    folder, paths, models, x = finetunes
    result = run("extract", folder / "w.safetensors", "--context", "2", "-o", tmp_path / "model2")
    assert result.exit_code == 0, result.output
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model2", output_loading_info=True
    )
    assert all(not v for v in info.values()), info  # no missing, unexpected or mismatched keys
    sf = SuperposedFile(folder / "w.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, sf.retrieve(name, 2)), name
    measured = H.rel(H.outputs(model, x), H.outputs(models[2], x))
    assert 0 < measured <= sf.header.hf["predicted_error"][2]  # the merge's prediction bounds it
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model2")
    assert tok("w1 w2")["input_ids"] == [3, 4]
    card = (tmp_path / "model2" / "README.md").read_text()
    digest = hashlib.sha256((folder / "w.safetensors").read_bytes()).hexdigest()
    assert digest in card and "Context 2 (`ft2`)" in card and "| kind | binary |" in card
    assert f"{sf.header.hf['predicted_error'][2]:.4g}" in card
    assert json.loads((tmp_path / "model2" / "config.json").read_text()) == json.loads(
        (paths[0] / "config.json").read_text()
    )


def test_extract_all_writes_one_folder_per_context_or_none(finetunes, tmp_path):
    folder, _, _, _ = finetunes
    out = tmp_path / "all"
    written = extract(folder / "w.safetensors", "all", out)
    assert [p.name for p in written] == ["ft0", "ft1", "ft2", "ft3"]
    for p in written:
        assert sorted(f.name for f in p.iterdir()) == [
            "README.md", "config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json",
        ]  # fmt: skip
    with pytest.raises(PspctlError, match="is a directory"):
        extract(folder / "w.safetensors", "all", out)
    assert sorted(p.name for p in out.iterdir()) == ["ft0", "ft1", "ft2", "ft3"]


def test_a_state_dict_name_or_format_still_gives_a_state_dict(finetunes, tmp_path):
    folder, _, _, _ = finetunes
    [path] = extract(folder / "w.safetensors", 1, tmp_path / "one.safetensors")
    assert path.is_file()
    assert [p.name for p in extract(folder / "w.safetensors", "all", tmp_path / "sd", fmt="pt")][
        0
    ] == "ft0.pt"


def test_extract_without_output_writes_a_model_folder_for_an_hf_merge(finetunes, tmp_path, monkeypatch):
    folder, _, _, _ = finetunes
    monkeypatch.chdir(tmp_path)
    result = run("extract", folder / "w.safetensors", "-c", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "context-1" / "config.json").is_file()
    assert (tmp_path / "context-1" / "model.safetensors").is_file()
    assert not (tmp_path / "context-1.safetensors").exists()


def test_format_hf_needs_hf_inputs(mlp_paths, tmp_path):
    merge(mlp_paths, tmp_path / "m.safetensors")
    result = run("extract", tmp_path / "m.safetensors", "-c", "0", "--format", "hf", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "records no Hugging Face folder" in result.output
    assert not (tmp_path / "x").exists()


def test_a_large_file_is_recorded_and_copied_while_its_sha256_matches(finetunes, tmp_path, monkeypatch):
    import pspctl.hf

    _, paths, _, _ = finetunes
    inputs = []
    for p in paths:  # copies: this test changes the first folder
        inputs.append(tmp_path / p.name)
        inputs[-1].mkdir()
        for f in p.iterdir():
            (inputs[-1] / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(pspctl.hf, "MAX_STORED_FILE", 1000)
    merge(inputs, tmp_path / "w.safetensors")
    records = {f["name"]: f for f in SuperposedFile(tmp_path / "w.safetensors").header.hf["files"]}
    assert records["tokenizer.json"]["stored"] is False and records["config.json"]["stored"] is True
    extract(tmp_path / "w.safetensors", 0, tmp_path / "a")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (inputs[0] / "tokenizer.json").read_bytes()
    (inputs[0] / "tokenizer.json").write_text("{}")
    with pytest.raises(MismatchError, match="changed since the merge"):
        extract(tmp_path / "w.safetensors", 0, tmp_path / "b")
    (inputs[0] / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer.json .* is not in the input folder"):
        extract(tmp_path / "w.safetensors", 0, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # all or nothing


# --- HF models without a task file ---------------------------------------------------------------


def test_analyze_builds_the_model_from_config_json(finetunes):
    from pspctl.analysis import analyze

    folder, _, _, _ = finetunes
    report = analyze(folder / "w.safetensors", max_samples=8, sparsities=[0.5])
    assert any(
        "built from the recorded config.json" in n and "metrics need a task file" in n for n in report.notes
    )
    assert report.task.endswith("(LlamaForCausalLM)")
    errors = [c.output_error for c in report.contexts]
    assert all(e is not None and e > 0 for e in errors)
    assert all(c.retrieved_metric is None for c in report.contexts)


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "T5ForConditionalGeneration"])
def test_heads_without_an_auto_class_are_built_as_config_json_names_them(tmp_path, arch):
    """AutoModel would build the bare encoder (other names, no head): the file's weights never
    fit it, and analyze/export failed. The class config.json names is built; an
    encoder-decoder is fed its token ids on both sides."""
    transformers = pytest.importorskip("transformers")
    from pspctl.analysis import analyze
    from pspctl.hf import hf_task
    from pspctl.merge import MergeOptions
    from pspctl.policy import Policy

    if arch == "BertForMaskedLM":
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32,
        )  # fmt: skip
    else:
        config = transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
    cls = getattr(transformers, arch)
    models = H.finetunes(lambda: cls(config), K=2, scale=0.01)
    for k, model in enumerate(models):
        model.save_pretrained(tmp_path / f"ft{k}")
    options = MergeOptions(base="mean", policy=Policy(superpose=("*",)))  # something to measure
    merge([tmp_path / "ft0", tmp_path / "ft1"], tmp_path / "w.safetensors", options)
    sf = SuperposedFile(tmp_path / "w.safetensors")
    task = hf_task(sf)
    model = task.build_model()
    assert type(model).__name__ == arch and task.source.endswith(f"({arch})")
    missing, unexpected = model.load_state_dict(sf.state_dict(1), strict=False)
    state = model.state_dict()
    assert unexpected == [] and missing  # save_pretrained drops the tied copies…
    assert {state[n].data_ptr() for n in missing} <= {state[n].data_ptr() for n in state if n not in missing}
    (ids,) = task.example_inputs()
    kwargs = {"decoder_input_ids": ids} if arch.startswith("T5") else {}
    with torch.no_grad():
        expected = models[1].eval()(input_ids=ids, **kwargs).logits
        assert H.rel(model(ids).logits, expected) < 0.1
    report = analyze(sf, max_samples=8, sparsities=[0.5])
    errors = [c.output_error for c in report.contexts]
    assert all(e is not None and 0 < e < 0.1 for e in errors), errors
    result = run("export", tmp_path / "w.safetensors", "--context", 1, "-o", tmp_path / "m.onnx", "--json")
    assert result.exit_code == 0, result.output  # validated against torch in onnxruntime
    assert (tmp_path / "m.onnx").is_file()
    report = json.loads(result.stdout)  # any sequence length: validated at another one too
    assert any(c["output"].endswith("(sequence 8)") for c in report["checks"]) and not report["notes"]
    # The default merge superposes nothing here: one graph of K whole models. Their head is
    # tied to the embeddings (save_pretrained dropped the copy), and BertForMaskedLM cannot be
    # traced inside torch.cond: it is then served per tensor.
    merge([tmp_path / "ft0", tmp_path / "ft1"], tmp_path / "d.safetensors")
    assert not SuperposedFile(tmp_path / "d.safetensors").names("superposed")
    result = run("export", tmp_path / "d.safetensors", "--multi", "-o", tmp_path / "d.onnx", "-q")
    assert result.exit_code == 0, result.output  # every context validated against torch


def test_an_encoder_decoder_without_architectures_gets_decoder_inputs_too(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pspctl.analysis import analyze
    from pspctl.hf import hf_task

    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    for k, model in enumerate(H.finetunes(lambda: transformers.T5Model(config), K=2, scale=0.01)):
        model.save_pretrained(tmp_path / f"ft{k}")
        saved = json.loads((tmp_path / f"ft{k}" / "config.json").read_text())
        saved.pop("architectures", None)
        (tmp_path / f"ft{k}" / "config.json").write_text(json.dumps(saved))
    merge([tmp_path / "ft0", tmp_path / "ft1"], tmp_path / "w.safetensors")
    task = hf_task(SuperposedFile(tmp_path / "w.safetensors"))
    model = task.build_model()
    assert type(model).__name__ == "T5Model" and task.source.endswith("(AutoModel)")
    assert model(*task.example_inputs()).last_hidden_state.shape[-1] == 32
    report = analyze(tmp_path / "w.safetensors", max_samples=4, sparsities=[0.5])
    assert all(c.output_error is not None for c in report.contexts)


def test_hf_task_picks_the_auto_class_and_makes_inputs_from_the_config():
    from pspctl.hf import auto_class_name, example_inputs

    assert auto_class_name({"architectures": ["GPT2LMHeadModel"]}) == "AutoModelForCausalLM"
    assert auto_class_name({"architectures": ["BertForSequenceClassification"]}) == (
        "AutoModelForSequenceClassification"
    )
    assert (
        auto_class_name({"architectures": ["ViTForImageClassification"]}) == "AutoModelForImageClassification"
    )
    assert auto_class_name({}) == "AutoModel"
    (ids,) = example_inputs({"vocab_size": 7, "max_position_embeddings": 8})
    assert ids.shape == (2, 8) and int(ids.max()) < 7 and ids.dtype == torch.int64
    (pixels,) = example_inputs({"image_size": 16, "num_channels": 3})
    assert pixels.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("multi", [False, True])
def test_an_hf_text_graph_takes_any_sequence_length_and_an_attention_mask(finetunes, tmp_path, multi):
    """As optimum exports them: inputs input_ids and attention_mask, batch and sequence length
    dynamic. Checked in onnxruntime against PyTorch at a size the graph was not traced at, with
    padding that the mask must hide (it had one input, fixed at the traced 16 tokens)."""
    import numpy as np

    from pspctl.onnx_export.validate import session

    folder, paths, models, _ = finetunes
    out = tmp_path / "g.onnx"
    args = ["--multi"] if multi else ["--context", "2"]
    result = run("export", folder / "w.safetensors", *args, "-o", out, "-q", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    checked = {c["output"] for c in report["checks"]}
    assert any("(sequence 8)" in o for o in checked) and all(c["passed"] for c in report["checks"])
    sess = session(out)
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    assert inputs == {
        **({"context": []} if multi else {}),
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
    }
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if multi:
        feed["context"] = np.array(2, dtype=np.int64)
    logits = sess.run(None, feed)[0]
    retrieved = type(models[2])(models[2].config).eval()
    retrieved.load_state_dict(SuperposedFile(folder / "w.safetensors").state_dict(2), strict=False)
    with torch.no_grad():
        expected = retrieved(input_ids=ids, attention_mask=mask).logits.numpy()
        unmasked = retrieved(input_ids=ids).logits.numpy()
    assert logits.shape == (3, 11, 64) and np.abs(logits - expected).max() < 1e-4
    assert np.abs(logits[0] - unmasked[0]).max() > 1e-3  # the mask is used: row 0's padding is hidden


def test_where_the_sequence_cannot_stay_dynamic_the_graph_is_traced_at_its_length(
    finetunes, tmp_path, monkeypatch
):
    """An architecture the exporter cannot trace with a free sequence length still exports,
    with the batch alone dynamic, and the report says which length it is fixed at."""
    from pspctl.onnx_export import api
    from pspctl.onnx_export.errors import TraceError
    from pspctl.onnx_export.validate import session

    real = api.to_onnx

    def no_dynamic_sequence(*args, **kwargs):
        if kwargs.get("axes") is not None:
            raise TraceError("the ONNX exporter cannot trace this model: Constraints violated (sequence)")
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "to_onnx", no_dynamic_sequence)
    folder, _, _, _ = finetunes
    result = run("export", folder / "w.safetensors", "-c", "1", "-o", tmp_path / "g.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["notes"] == [
        "sequence 16 fixed as traced: the exporter could not keep it dynamic (Constraints violated (sequence))"
    ]
    assert not any("(sequence" in c["output"] for c in report["checks"])  # not validated at another length
    shapes = {i.name: i.shape for i in session(tmp_path / "g.onnx").get_inputs()}
    assert shapes == {"input_ids": ["batch", 16], "attention_mask": ["batch", 16]}


def test_without_transformers_one_line_names_the_extra(finetunes, monkeypatch):
    folder, _, _, _ = finetunes
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    result = run("export", folder / "w.safetensors", "-c", "0", "-o", folder / "m.onnx")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: building a Hugging Face model from config.json needs transformers: pip install 'pspctl[hf]'"
    )


# --- other containers ----------------------------------------------------------------------------


def _state():
    return {"lin.weight": torch.randn(4, 3), "lin.bias": torch.randn(4)}


def test_lightning_prefix_is_stripped_when_unambiguous(tmp_path):
    state = _state()
    torch.save(
        {"epoch": 1, "global_step": 9, "state_dict": {f"model.{k}": v for k, v in state.items()}},
        tmp_path / "a.ckpt",
    )
    ckpt = open_checkpoint(tmp_path / "a.ckpt")
    assert ckpt.names == ["lin.weight", "lin.bias"] and torch.equal(ckpt["lin.weight"], state["lin.weight"])
    assert any("LightningModule attribute prefix 'model.'" in n for n in ckpt.notes)


def test_lightning_with_several_prefixes_says_so_and_strip_prefix_picks_one(tmp_path):
    state = {"model.lin.weight": torch.randn(4, 3), "loss.weight": torch.ones(4)}
    torch.save({"global_step": 9, "optimizer_states": [], "state_dict": state}, tmp_path / "a.ckpt")
    ckpt = open_checkpoint(tmp_path / "a.ckpt")
    assert ckpt.names == list(state) and any("share no one module prefix" in n for n in ckpt.notes)
    ckpt = open_checkpoint(tmp_path / "a.ckpt", strip_prefix="model.")
    assert ckpt.names == ["lin.weight"] and any("dropped 1 tensors" in n for n in ckpt.notes)
    with pytest.raises(InputError, match="no tensor name starts with --strip-prefix 'x.'"):
        open_checkpoint(tmp_path / "a.ckpt", strip_prefix="x.")


def test_a_plain_state_dict_keeps_a_common_prefix(tmp_path):
    torch.save({f"model.{k}": v for k, v in _state().items()}, tmp_path / "a.pt")
    assert open_checkpoint(tmp_path / "a.pt").names == ["model.lin.weight", "model.lin.bias"]


def test_a_lightning_module_holding_one_layer_directly_keeps_its_names(tmp_path):
    """`self.lin = nn.Linear(...)`: `lin.` names the layer, not a wrapper; stripping it would
    leave bare `weight`/`bias`."""
    torch.save({"global_step": 1, "state_dict": _state()}, tmp_path / "a.ckpt")
    ckpt = open_checkpoint(tmp_path / "a.ckpt")
    assert ckpt.names == ["lin.weight", "lin.bias"]
    assert any("a Lightning checkpoint of one layer 'lin': kept as it is" in n for n in ckpt.notes)


def test_a_wrapped_network_with_its_own_tensors_loses_the_prefix_too(tmp_path):
    """CLIP-like: the network under `self.model` has submodules and a tensor of its own
    (`model.logit_scale`); every key is the network's."""
    state = {**_state(), "logit_scale": torch.ones(())}
    torch.save(
        {"global_step": 1, "state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "a.ckpt"
    )
    ckpt = open_checkpoint(tmp_path / "a.ckpt")
    assert ckpt.names == list(state) and torch.equal(ckpt["logit_scale"], state["logit_scale"])
    assert any("LightningModule attribute prefix 'model.'" in n for n in ckpt.notes)


def test_merge_strip_prefix_on_the_command_line(tmp_path):
    for i in range(2):
        torch.save({f"net.{k}": v for k, v in _state().items()}, tmp_path / f"m{i}.pt")
    result = run(
        "merge",
        tmp_path / "m0.pt",
        tmp_path / "m1.pt",
        "-o",
        tmp_path / "w.safetensors",
        "--strip-prefix",
        "net.",
    )
    assert result.exit_code == 0, result.output
    sf = SuperposedFile(tmp_path / "w.safetensors")
    assert sf.names() == ["lin.weight", "lin.bias"] and sf.header.recipe["strip_prefix"] == "net."


def test_timm_pth_tar_is_read_safely(tmp_path):
    state = _state()
    torch.save(
        {"epoch": 7, "arch": "resnet18", "state_dict": state, "state_dict_ema": _state(), "version": 2,
         "args": argparse.Namespace(model="resnet18", lr=0.1)},
        tmp_path / "model_best.pth.tar",
    )  # fmt: skip
    ckpt = open_checkpoint(tmp_path / "model_best.pth.tar")
    assert ckpt.names == list(state) and torch.equal(ckpt["lin.bias"], state["lin.bias"])
    assert any("state_dict_ema" in n for n in ckpt.notes)
    assert open_checkpoint(tmp_path).names == list(state)  # the directory's only checkpoint


def test_the_readme_hugging_face_section_runs_as_written(finetunes, tmp_path, monkeypatch):
    """README "Hugging Face models": its commands on four fine-tunes named a/ b/ c/ d/, then its
    Python; the model loaded is the retrieved context 2, with its tokenizer."""
    import re
    import shlex
    import shutil

    from tests.test_readme import README

    section = README.split("## Hugging Face models", 1)[1].split("\n## ", 1)[0]
    [commands] = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    [snippet] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    _, paths, models, x = finetunes
    for name, path in zip("abcd", paths, strict=True):
        shutil.copytree(path, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    for line in commands.splitlines():
        result = run(*shlex.split(line.split("#")[0])[1:])
        assert result.exit_code == 0, (line, result.output)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - our own README
    measured = H.rel(H.outputs(scope["model"], x), H.outputs(models[2], x))
    assert 0 < measured <= SuperposedFile("w.safetensors").header.hf["predicted_error"][2]
    assert scope["tokenizer"]("w1 w2")["input_ids"] == [3, 4]


def test_tune_without_a_task_file_distils_on_made_up_inputs(finetunes, tmp_path):
    """No task file: tune distils each context towards its original folder on token ids made
    up from config.json, and reports agreement with the original; the retrieved models move
    towards the originals on inputs it never saw."""
    folder, _, models, x = finetunes
    out = tmp_path / "t.safetensors"
    result = run("tune", folder / "w.safetensors", "--steps", "60", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["objective"] == "distill" and data["metric"] == "agreement"
    assert all(row["agreement"] == 100.0 for row in data["originals"])

    build, _ = H.llama(tied=False)

    def errors(path):
        sf = SuperposedFile(path)
        retrieved = []
        for k in range(len(models)):
            model = build().eval()
            model.load_state_dict(sf.state_dict(k))
            retrieved.append(H.rel(H.outputs(model, x), H.outputs(models[k], x)))
        return retrieved

    before, after = errors(folder / "w.safetensors"), errors(out)
    assert sum(after) < 0.8 * sum(before), (before, after)
    # The tuned file is still an HF merge: its non-weight files came along, extract writes folders.
    merged, tuned = SuperposedFile(folder / "w.safetensors"), SuperposedFile(out)
    assert tuned.header.hf == merged.header.hf
    assert all(
        tuned.file(f["name"]) == merged.file(f["name"]) for f in merged.header.hf["files"] if f["stored"]
    )
    assert run("extract", out, "-c", "1", "-o", tmp_path / "ft1").exit_code == 0
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "ft1").iterdir()
    }


def test_tune_without_a_task_file_or_the_originals_says_what_it_needs(finetunes, tmp_path):
    import shutil

    folder, paths, _, _ = finetunes
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "w.safetensors", alone / "w.safetensors")
    moved = tmp_path / "moved"
    shutil.move(paths[1], moved)
    try:
        result = run("tune", alone / "w.safetensors", "--steps", "1", "-o", tmp_path / "t.safetensors")
    finally:
        shutil.move(moved, paths[1])
    assert result.exit_code == 2
    assert "only distil, and the original models were not found; pass --task" in result.output
    assert not (tmp_path / "t.safetensors").exists()


def test_dtype_is_restored_in_the_model_folder(tmp_path):
    from safetensors import safe_open

    build, _ = H.llama(tied=False)
    paths = []
    for k, model in enumerate(H.finetunes(build)):
        paths.append(tmp_path / f"b{k}")
        model.to(torch.bfloat16).save_pretrained(paths[-1])
    merge(paths, tmp_path / "w.safetensors")
    extract(tmp_path / "w.safetensors", 0, tmp_path / "out")
    with (
        safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f,
        safe_open(str(paths[0] / "model.safetensors"), "pt") as g,
    ):
        assert sorted(f.keys()) == sorted(g.keys())
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in f.keys())
        assert f.metadata() == {"format": "pt"}


def test_max_shard_size_shards_the_weights_with_an_index(finetunes, tmp_path):
    import transformers

    folder, _, _, _ = finetunes
    result = run(
        "extract", folder / "w.safetensors", "-c", "1", "-o", tmp_path / "m", "--max-shard-size", "40KB"
    )
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "m" / "model.safetensors").exists()
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:  # each at most 40 kB, unless it holds one larger tensor
        size = sum(t.nbytes for t in load_file(tmp_path / "m" / shard).values())
        assert size <= 40_000 or len([n for n, s in index["weight_map"].items() if s == shard]) == 1
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert all(not v for v in info.values()), info
    sf = SuperposedFile(folder / "w.safetensors")
    assert all(torch.equal(t, sf.retrieve(n, 1)) for n, t in model.state_dict().items())
    result = run(
        "extract", folder / "w.safetensors", "-c", "1", "-o", tmp_path / "n", "--max-shard-size", "big"
    )
    assert result.exit_code == 2 and "is not a size; use e.g. 2GB" in result.output


def test_a_model_transformers_renames_runs_in_every_command(tmp_path):
    """transformers 5 builds ViT under other weight names than `save_pretrained` writes (it
    renames them in from_pretrained), and its embeddings own tensors beside submodules:
    analyze, export and tune take its renaming, and the tuned file keeps the saved names."""
    from transformers import ViTForImageClassification

    from pspctl.onnx_export.validate import session

    build, x = H.vit()
    models = H.finetunes(build, K=3)
    for k, model in enumerate(models):
        model.save_pretrained(tmp_path / f"v{k}")
    saved = list(load_file(str(tmp_path / "v0" / "model.safetensors")))
    if set(saved) == set(models[0].state_dict()):
        pytest.skip("this transformers saves ViT under the names it builds it with")
    out = tmp_path / "w.safetensors"
    merge([tmp_path / f"v{k}" for k in range(3)], out)
    sf = SuperposedFile(out)
    assert set(sf.names()) == set(saved)

    result = run("analyze", out, "--json", tmp_path / "report.json", "-q")
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "report.json").read_text())["layers"]
    assert {row["name"] for row in layers} == set(sf.names("superposed"))  # hooked under the model's names
    assert all(row["measured"] > 0 for row in layers)

    result = run("export", out, "--multi", "-o", tmp_path / "multi.onnx")
    assert result.exit_code == 0, result.output
    graph = session(tmp_path / "multi.onnx")
    for k in range(3):
        reference = build().eval()
        reference.load_state_dict(sf.named_as(reference).state_dict(k))
        (y,) = graph.run(["output"], {"context": torch.tensor(k).numpy(), "input": x[0].numpy()})
        torch.testing.assert_close(torch.from_numpy(y), H.outputs(reference, x), atol=1e-4, rtol=1e-3)

    result = run("tune", out, "--steps", "5", "-o", tmp_path / "t.safetensors")
    assert result.exit_code == 0, result.output
    tuned = SuperposedFile(tmp_path / "t.safetensors")
    assert tuned.names() == sf.names() and tuned.header.hf == sf.header.hf
    assert run("extract", tmp_path / "t.safetensors", "-c", "all", "-o", tmp_path / "ext").exit_code == 0
    model, info = ViTForImageClassification.from_pretrained(tmp_path / "ext" / "v1", output_loading_info=True)
    assert not any(info.values()), info
    retrieved = tuned.named_as(model).state_dict(1)
    assert all(torch.equal(retrieved[n], t) for n, t in model.state_dict().items())
    assert any(not torch.equal(tuned.superposed(n), sf.superposed(n)) for n in sf.names("superposed"))


def test_folders_whose_configs_differ_beyond_their_labels_are_refused(tmp_path):
    """Every context is built from one config.json (analyze, export, tune): a fine-tune saved
    with another activation would be analysed as the first's model. Where it came from may differ."""
    build, _ = H.bert()
    for k, model in enumerate(H.finetunes(build, K=2)):
        model.save_pretrained(tmp_path / f"b{k}")
    config = json.loads((tmp_path / "b1" / "config.json").read_text())
    (tmp_path / "b1" / "config.json").write_text(
        json.dumps({**config, "_name_or_path": "elsewhere", "hidden_act": "relu"})
    )
    result = run("merge", tmp_path / "b0", tmp_path / "b1", "-o", tmp_path / "w.safetensors")
    assert result.exit_code == 3 and not (tmp_path / "w.safetensors").exists()
    line = result.output.strip()
    assert "\n" not in line and "b1/config.json differs from" in line
    assert 'hidden_act "relu", not "gelu"' in line and "only the labels" in line
    assert "_name_or_path" not in line
    # Where a folder came from is no reason for a config per context (nor format v3).
    (tmp_path / "b1" / "config.json").write_text(json.dumps({**config, "_name_or_path": "elsewhere"}))
    report = merge([tmp_path / "b0", tmp_path / "b1"], tmp_path / "w.safetensors")
    sf = SuperposedFile(tmp_path / "w.safetensors")
    assert report.warnings == [] and sf.header.format_version == 2
    assert all("per_context" not in f for f in sf.header.hf["files"])


def test_fine_tunes_on_different_tasks_keep_their_own_labels_and_tokenizer(tmp_path):
    """Fine-tunes of one parent on different tasks: each config.json has its own labels (and
    here one its own vocabulary file). Each is kept per context (format v3) and extracted with
    its own model; a file one folder lacks is still the first's, with a warning."""
    transformers = pytest.importorskip("transformers")
    build, x = H.bert()
    models = H.finetunes(build, K=3)
    names = [["neg", "neu", "pos"], ["contradiction", "neutral", "entailment"], ["a", "b", "c"]]
    folders = []
    for k, model in enumerate(models):
        model.config.id2label = dict(enumerate(names[k]))
        model.config.label2id = {n: i for i, n in enumerate(names[k])}
        model.config.finetuning_task = f"task{k}"
        folders.append(tmp_path / f"b{k}")
        model.save_pretrained(folders[k])
        (folders[k] / "vocab.txt").write_text("[PAD]\n[UNK]\n" + ("x\n" if k == 2 else ""))
        if k != 1:
            (folders[k] / "notes.txt").write_text("only some folders have this")
    (folders[2] / "chat_template.jinja").write_text("{{ messages }}")  # not in the first folder
    report = merge(folders, tmp_path / "w.safetensors")
    assert report.warnings == [
        f"chat_template.jinja of {folders[2]} not in {folders[0]}: no extracted model gets it",
        f"notes.txt of {folders[1]} differs from {folders[0]}'s (or is missing); every extracted model "
        f"gets {folders[0]}'s",
    ]
    assert any(
        n.endswith("; each context keeps its own config.json, vocab.txt (format v3)") for n in report.notes
    )
    sf = SuperposedFile(tmp_path / "w.safetensors")
    assert sf.header.format_version == 3
    records = {f["name"]: f for f in sf.header.hf["files"]}
    assert len(records["config.json"]["per_context"]) == 3 and "per_context" not in records["notes.txt"]
    digests = [v["sha256"] for v in records["vocab.txt"]["per_context"]]
    assert digests[0] == digests[1] == records["vocab.txt"]["sha256"] != digests[2]

    info = " ".join(run("info", tmp_path / "w.safetensors").output.split())
    assert "pspctl format v3" in info and "; per context: config.json, vocab.txt" in info
    out = extract(tmp_path / "w.safetensors", "all", tmp_path / "out")
    for k, folder in enumerate(out):
        for name in ("config.json", "vocab.txt"):
            assert (folder / name).read_bytes() == (folders[k] / name).read_bytes(), (k, name)
        assert (folder / "notes.txt").read_bytes() == (folders[0] / "notes.txt").read_bytes()
        loaded = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        assert loaded.config.id2label == dict(enumerate(names[k]))
        assert loaded.config.finetuning_task == f"task{k}"
        assert H.rel(H.outputs(loaded, x), H.outputs(models[k], x)) < 0.1

    # A rewrite keeps every context's files: tune carries them over.
    result = run("tune", tmp_path / "w.safetensors", "--steps", 1, "-o", tmp_path / "t.safetensors", "-q")
    assert result.exit_code == 0, result.output
    tuned = SuperposedFile(tmp_path / "t.safetensors")
    assert tuned.header.format_version == 3 and tuned.stored_files() == sf.stored_files()


def test_labels_of_a_config_too_large_to_store_are_refused(tmp_path, monkeypatch):
    """A config.json over the stored limit cannot be kept per context: differing labels would
    be lost for every context but the first, so they are refused, as before format v3."""
    import pspctl.hf

    build, _ = H.bert()
    for k, model in enumerate(H.finetunes(build, K=2)):
        model.config.id2label = {0: f"a{k}", 1: "b", 2: "c"}
        model.save_pretrained(tmp_path / f"b{k}")
    monkeypatch.setattr(pspctl.hf, "MAX_STORED_FILE", 100)
    result = run("merge", tmp_path / "b0", tmp_path / "b1", "-o", tmp_path / "w.safetensors")
    assert result.exit_code == 3 and not (tmp_path / "w.safetensors").exists()
    with pytest.raises(MismatchError, match=r"b1/config.json differs from .* in id2label, but .* "
                       "cannot be kept per context"):  # fmt: skip
        merge([tmp_path / "b0", tmp_path / "b1"], tmp_path / "w.safetensors")


def test_a_per_context_file_list_of_the_wrong_length_is_corrupt(tmp_path):
    from pspctl.errors import FormatError
    from pspctl.header import Header, check_header

    record = {"name": "config.json", "size": 2, "sha256": "0" * 64, "stored": True}
    variants = [{"size": 2, "sha256": "0" * 64}, {"size": 3, "sha256": "1" * 64}]
    hf = {"source": "a", "files": [{**record, "per_context": variants}], "predicted_error": []}
    header = Header(kind="binary", seed=0, num_contexts=3, labels=["a", "b", "c"], tensors={}, hf=hf)
    header.format_version = 3
    with pytest.raises(FormatError, match="per_context does not list 3 contexts"):
        check_header(header, "3")
    header.format_version = 2
    with pytest.raises(FormatError, match="format version 2 has no per-context files"):
        check_header(header, "2")
    from pspctl.header import parse_header

    text = header.to_json().replace('"per_context":[', '"per_context":[],"x":[', 1)
    with pytest.raises(FormatError, match="per_context needs a stored file"):  # empty: no crash
        parse_header(text)


def test_an_input_given_twice_is_warned(tmp_path, mlp_paths):
    report = merge([mlp_paths[0], mlp_paths[1], mlp_paths[0]], tmp_path / "w.safetensors")
    assert len(report.warnings) == 1
    assert re.fullmatch(
        r"model0-0, model0-2 are the same checkpoint \(sha256 [0-9a-f]{12}…\): .*", report.warnings[0]
    )
