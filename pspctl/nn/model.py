"""`superpose`, `save`, `load`: a model in superposition, as a module and as a pspctl file."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pspctl.architectures import axes_from_model
from pspctl.checkpoints import dtype_name, find_ties
from pspctl.contexts import Kind, make_contexts
from pspctl.dtypes import torch_dtype
from pspctl.errors import ContextError, MismatchError, PolicyError, ValidationError
from pspctl.fileformat import Header, SuperposedFile, SuperposedWriter, TensorMeta
from pspctl.header import check_labels
from pspctl.merge import MergeOptions, plan
from pspctl.nn.layers import OwnTensors, PerContext, PSPConv, PSPLayer, PSPLinear
from pspctl.nn.tensors import Binding, Stacked, Superposed, initial_superposed, mix_contexts
from pspctl.policy import SHAPE_RULES, Policy, Role, TensorInfo
from pspctl.task import check_fits, model_ties

__all__ = ["PSPModel", "load", "save", "superpose"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRAINED_APART = "equal in every input, then trained apart"  # a shared tensor that training changed


class PSPModel(nn.Module):
    """K models in one: `module` with its layers replaced by PSP layers.

    Use `set_context(k)` or `with model.context(k): ...` to choose which model runs.
    `tensors` maps each original state_dict key to its `Superposed` or `Stacked` tensor;
    `metas` holds what a saved file records about each.
    """

    def __init__(
        self,
        module: nn.Module,
        tensors: dict[str, Binding],
        metas: dict[str, TensorMeta],
        *,
        kind: Kind,
        seed: int,
        labels: Sequence[str],
        mixture: bool = False,
        base: dict[str, Any] | None = None,
        tied: Mapping[str, str] | None = None,
        owned: Sequence[OwnTensors] = (),
        saved_names: Mapping[str, str] | None = None,
    ):
        super().__init__()
        self.module = module
        self.owned = nn.ModuleList(owned)  # tensors of modules that also have submodules
        # The file's name for each tensor the model names otherwise (transformers' renaming)
        self.saved_names = dict(saved_names or {})
        self.tensors = tensors  # a plain dict: the layers already own these modules
        self.metas = metas
        self.kind = kind  # as stored: a mixture is saved as complex contexts
        self.seed = seed
        self.labels = list(labels)
        self.mixture = mixture
        self.base = base  # the file's base record (format v2), kept when saved again
        self.tied = dict(tied or {})  # alias -> name: one tensor under two names (format v2)
        self.set_context(0)

    @property
    def num_contexts(self) -> int:
        return len(self.labels)

    @property
    def active_context(self) -> int:
        return self._context

    def set_context(self, k: int) -> None:
        """Make context k (0-based) the active model.

        Raises:
            ContextError: k out of range.
        """
        if not 0 <= k < self.num_contexts:
            raise ContextError(
                f"context {k} out of range: this model holds contexts 0..{self.num_contexts - 1}"
            )
        self._context = k
        for m in self.modules():
            if isinstance(m, PSPLayer):
                m.context = k

    @contextmanager
    def context(self, k: int) -> Iterator[PSPModel]:
        """Run context k inside the block, then restore the previous one."""
        previous = self._context
        self.set_context(k)
        try:
            yield self
        finally:
            self.set_context(previous)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for holder in self.owned:
            holder.assign()  # type: ignore[operator]
        try:
            return self.module(*args, **kwargs)
        finally:
            for holder in self.owned:
                holder.clear()  # type: ignore[operator]

    def state_dict_for(self, k: int) -> dict[str, Tensor]:
        """Context k's plain state_dict (retrieved weights in the original dtypes), like extract."""
        out = {}
        for name, b in self.tensors.items():
            if name not in self.metas and name not in self.tied:
                continue  # a key the model ties but the file never had (save_pretrained's)
            t = b.retrieve(k) if isinstance(b, Superposed) else b.get(k)
            out[name] = t.detach().to(torch_dtype(self.metas[self.tied.get(name, name)].dtype)).clone()
        return out


def _direct_tensors(module: nn.Module) -> list[str]:
    params = [n for n, p in module._parameters.items() if p is not None]
    buffers = [
        n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set
    ]
    return params + buffers


def _convert(model: nn.Module, tensors: Mapping[str, Binding]) -> tuple[nn.Module, list[OwnTensors]]:
    """Replace every leaf module owning tensors with its PSP layer, and give every other
    owner an `OwnTensors`; returns the new root and those holders."""
    root, owned = model, []
    for prefix, module in list(model.named_modules()):
        names = _direct_tensors(module)
        if not names:
            continue
        full = {n: f"{prefix}.{n}" if prefix else n for n in names}
        bindings = {n: tensors[f] for n, f in full.items()}
        if next(module.children(), None) is not None:
            owned.append(OwnTensors(module, bindings))
            continue
        bias = bindings.get("bias")
        new: nn.Module
        if type(module) is nn.Linear:
            new = PSPLinear(bindings["weight"], bias)  # type: ignore[arg-type]
        elif type(module) in CONVS:
            new = PSPConv(module, bindings["weight"], bias)  # type: ignore[arg-type]
        else:
            new = PerContext(module, bindings)
        if not prefix:
            root = new
        else:
            parent_name, _, child = prefix.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return root, owned


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def superpose(
    model: nn.Module,
    num_contexts: int,
    *,
    kind: Kind | str = Kind.BINARY,
    seed: int = 0,
    policy: Policy | None = None,
    mixture: bool = False,
    labels: Sequence[str] | None = None,
    max_rotation_fan_in: int = 4096,
) -> PSPModel:
    """A PSP copy of `model` holding `num_contexts` models; `model` itself is left unchanged.

    Each tensor is superposed or kept per context as `merge` would decide for this model
    (same `policy`, same contexts for the same seed and tensor name). Context 0 starts as
    `model` exactly; the others start as `model`'s weights scrambled by their contexts.

    Args:
        mixture: use the paper's mixture of contexts (Section 5.1); needs kind complex.

    Raises:
        PolicyError: bad kind, mixture without complex contexts, rotation fan-in over the limit.
        MismatchError: `labels` is not one label per context.
    """
    try:
        kind = Kind(kind)
    except ValueError:
        raise PolicyError(f"unknown kind {kind!r}: expected binary, complex, rotation or onepower") from None
    if mixture and kind is not Kind.COMPLEX:
        raise PolicyError(f"a mixture of contexts needs --kind complex, not {kind.value}")
    if num_contexts < 1:
        raise PolicyError(f"need at least 1 context, got {num_contexts}")
    if labels is not None and len(labels) != num_contexts:
        raise MismatchError(f"{len(labels)} labels for {num_contexts} contexts")
    model = copy.deepcopy(model)
    state = model.state_dict(keep_vars=True)
    trainable = _trainable(model)
    axes = axes_from_model(model)
    ties = find_ties(state)
    infos = [
        TensorInfo(n, tuple(t.shape), dtype_name(t.dtype), axes.get(n))
        for n, t in state.items()
        if n not in ties
    ]
    options = MergeOptions(
        kind=kind, seed=seed, policy=policy or SHAPE_RULES, max_rotation_fan_in=max_rotation_fan_in
    )
    tensors: dict[str, Binding] = {}
    metas: dict[str, TensorMeta] = {}
    for info, d in zip(infos, plan(infos, num_contexts, options), strict=True):
        t = state[info.name].detach()
        if d.role is Role.SUPERPOSED:
            ctx = make_contexts(kind, num_contexts, d.fan_in, seed, info.name)
            ctx = mix_contexts(ctx) if mixture else ctx
            axis = info.fan_in_axis
            tensors[info.name] = Superposed(ctx, initial_superposed(t, ctx, axis), axis=axis)
            tensors[info.name].requires_grad_(info.name in trainable)
        else:
            tensors[info.name] = Stacked([_working(t)] * num_contexts, trainable=info.name in trainable)
        metas[info.name] = TensorMeta(
            d.role.value, info.dtype, list(info.shape), d.fan_in, d.reason, fan_in_axis=info.fan_in_axis
        )
    tensors.update({alias: tensors[name] for alias, name in ties.items()})
    labels = check_labels(labels if labels else [str(k) for k in range(num_contexts)], num_contexts)
    stored_kind = Kind.COMPLEX if mixture else kind
    root, owned = _convert(model, tensors)
    return PSPModel(
        root, tensors, metas, kind=stored_kind, seed=seed, labels=labels, mixture=mixture, tied=ties, owned=owned
    )  # fmt: skip


def _working(t: Tensor) -> Tensor:
    # Train in float32 whatever the stored dtype; save() casts back.
    return t.float() if t.is_floating_point() else t


def save(
    model: PSPModel,
    path: str | Path,
    *,
    force: bool = False,
    recipe: Mapping[str, Any] | None = None,
    task: str | None = None,
    inputs: Sequence[Mapping[str, Any]] = (),
    history: Sequence[Mapping[str, Any]] = (),
    max_shard_size: int | str | None = None,
    hf: Mapping[str, Any] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> None:
    """Write `model` as an ordinary pspctl superposed file, atomically (with `max_shard_size`:
    as shards of at most that size and their index).

    Under DDP call it on rank 0 (every rank holds the whole model). A model sharded with
    FSDP2 (`fully_shard`) is gathered tensor by tensor, a collective: call `save` on every
    rank; only rank 0 writes.

    `hf` and `files` carry a Hugging Face merge's record and its stored non-weight files
    (config.json, tokenizer…) over, so that `extract` still writes model folders.

    Raises:
        ValidationError: a tensor holds NaN/Inf (a broken file is never written).
        OutputError: `path` exists without `force`, or its directory does not exist.
    """
    writer = SuperposedWriter(
        model.kind, model.num_contexts, linked=bool(model.base and model.base["linked"])
    )
    written: set[int] = set()
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    saved = model.saved_names
    for own_name, b in model.tensors.items():
        if own_name in model.tied or id(b) in written:
            continue  # stored once, under the name it is tied to
        written.add(id(b))
        meta, name = model.metas[own_name], saved.get(own_name, own_name)
        value = b.value() if isinstance(b, Superposed) else b.stacked()
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise ValidationError(f"{name} has NaN/Inf values; refusing to write {path}")
        if isinstance(b, Superposed):
            writer.add_superposed(name, meta, value, b.ctx, torch_dtype(meta.dtype), base=b.base)
            continue
        value = value.to(torch_dtype(meta.dtype))
        if meta.role == Role.SHARED and all(torch.equal(value[0], v) for v in value[1:]):
            writer.add_shared(name, meta, value[0])
        elif meta.role == Role.SHARED:  # training made a shared tensor differ between contexts
            writer.add_per_context(
                name, replace(meta, role=Role.PER_CONTEXT.value, reason=TRAINED_APART), value
            )
        else:
            writer.add_per_context(name, meta, value)
    header = Header(
        kind=model.kind.value,
        seed=model.seed,
        num_contexts=model.num_contexts,
        labels=model.labels,
        tensors={},
        inputs=[dict(i) for i in inputs],
        recipe={"mixture": model.mixture, **(recipe or {})},
        task=task,
        history=[dict(h) for h in history],
        base=model.base,
        tied={saved.get(a, a): saved.get(n, n) for a, n in model.tied.items()},
        hf=None if hf is None else dict(hf),
    )
    for name, data in (files or {}).items():
        writer.add_file(name, data)
    if sharded and torch.distributed.get_rank() != 0:
        return  # the whole tensors were gathered on every rank; rank 0 writes them
    writer.write(path, header, force=force, max_shard_size=max_shard_size)


def load(path: str | Path | SuperposedFile, model: nn.Module) -> PSPModel:
    """The PSP model stored in a pspctl file, built on `model`'s architecture.

    `model` (e.g. a task's `build_model()`) supplies the modules; every tensor comes from
    the file. All floating tensors become trainable, the file's buffers stay buffers.

    Raises:
        MismatchError: `model` does not fit the file (keys or shapes differ).
    """
    file = path if isinstance(path, SuperposedFile) else SuperposedFile(path)
    check_fits(model, file.shapes(), str(file.path), whose="the given")
    file = file.named_as(model)  # a transformers model may name its weights otherwise
    model = copy.deepcopy(model)
    trainable = _trainable(model)
    tensors: dict[str, Binding] = {}
    for name in file.names():
        if file.header.tensors[name].role == Role.SUPERPOSED:
            axis = file.header.tensors[name].fan_in_axis
            tensors[name] = Superposed(file.contexts(name), file.superposed(name), file.base(name), axis)
            tensors[name].requires_grad_(name in trainable)
        else:
            stack = _working(file.stacked(name))
            tensors[name] = Stacked(list(stack), trainable=name in trainable and stack.is_floating_point())
    # A tied alias is the same binding: both modules use (and train) one tensor. The model's
    # own ties cover a key saved once (save_pretrained drops a tied head).
    tensors.update({alias: tensors[name] for alias, name in file.tied.items()})
    for alias, name in model_ties(model).items():
        have = name if name in tensors else alias if alias in tensors else None
        if have is not None:
            tensors.setdefault(alias, tensors[have])
            tensors.setdefault(name, tensors[have])
    root, owned = _convert(model, tensors)
    return PSPModel(
        root,
        tensors,
        dict(file.header.tensors),
        kind=file.kind,
        seed=file.header.seed,
        labels=file.labels,
        mixture=bool(file.header.recipe.get("mixture", False)),
        base=file.header.base,
        tied=file.tied,
        owned=owned,
        saved_names=file.saved_names,
    )
