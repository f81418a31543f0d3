"""Each tensor's fan-in axis, from the architecture rather than from the tensor's rank. Pure.

Superposition binds a weight's fan-in: the axis its layer sums over (Proposition 2's M). For
`nn.Linear` and `nn.Conv*` that is every dim but dim 0, the default. transformers' `Conv1D`
(GPT-2's `c_attn`, `c_fc`, `c_proj`) stores its weight as [in, out], the transpose of
`nn.Linear`, so its fan-in is dim 0; a transposed convolution ([in, out/groups, *kernel])
sums over dim 0 too. Binding "every dim but dim 0" there binds the fan-out: the retrieval
error is then not the one Proposition 2 predicts, and the policy's M is wrong.

Three sources, later ones winning: a model (the task file's `build_model()`, read by module
type: transformers' class is matched by name so transformers is not imported), a Hugging
Face `config.json` (`model_type`/`architectures`, through `FAMILIES`), and the user's
`--fan-in-axis GLOB=AXIS`. Only non-default axes are returned: None means the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from pspctl.errors import PolicyError

__all__ = ["FAMILIES", "axes_from_config", "axes_from_model", "parse_overrides", "resolve_axes"]

# Known Hugging Face families whose weights are not Linear-like: model_type -> (glob, axis).
# Everything not listed is Linear-like (every dim but dim 0).
_CONV1D = (
    ("*.c_attn.weight", 0),
    ("*.q_attn.weight", 0),
    ("*.c_proj.weight", 0),
    ("*.c_fc.weight", 0),
)
FAMILIES: dict[str, tuple[tuple[str, int], ...]] = {
    "gpt2": _CONV1D,  # GPT2Model, GPT2LMHeadModel, …: transformers.pytorch_utils.Conv1D
    "decision_transformer": _CONV1D,  # its GPT-2 backbone
    "imagegpt": _CONV1D,
    "openai-gpt": (("*.c_attn.weight", 0), ("*.c_proj.weight", 0), ("*.c_fc.weight", 0)),
}
# architectures[0] prefixes that name a family when model_type is missing.
_ARCHITECTURES = {"GPT2": "gpt2", "DecisionTransformer": "decision_transformer", "ImageGPT": "imagegpt"}


def family(config: Mapping[str, Any]) -> str | None:
    """The `FAMILIES` key a config.json belongs to, or None for a Linear-like model."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in FAMILIES:
        return model_type
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        for prefix, name in _ARCHITECTURES.items():
            if archs[0].startswith(prefix):
                return name
    return None


def axes_from_config(config: Mapping[str, Any], names: Sequence[str]) -> dict[str, int]:
    """The non-default fan-in axes of the tensors `names` of a model with this config.json."""
    fam = family(config)
    if fam is None:
        return {}
    out = {}
    for name in names:
        for glob, axis in FAMILIES[fam]:
            if fnmatchcase(name, glob):
                out[name] = axis
                break
    return out


def _module_axis(module: nn.Module) -> int | None:
    # transformers' Conv1D by name (and its nf attribute), so transformers need not be imported.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 0  # [in, out/groups, *kernel]: each output sums over the in channels
    return None  # Linear, Conv (in/groups × kernel), Embedding (a lookup): every dim but 0


def axes_from_model(model: nn.Module) -> dict[str, int]:
    """The non-default fan-in axes of `model`'s weights, by state_dict key, from module types."""
    out = {}
    for prefix, module in model.named_modules():
        axis = _module_axis(module)
        weight = module._parameters.get("weight") if axis is not None else None
        if weight is not None and weight.dim() > axis:  # type: ignore[operator]
            out[f"{prefix}.weight" if prefix else "weight"] = axis
    return out  # type: ignore[return-value]


def parse_overrides(specs: Sequence[str]) -> tuple[tuple[str, int | None], ...]:
    """`--fan-in-axis GLOB=AXIS` values: AXIS a dim index, or `rest` for every dim but dim 0.

    Raises:
        PolicyError: a value that is not GLOB=AXIS.
    """
    out: list[tuple[str, int | None]] = []
    for spec in specs:
        glob, sep, axis = spec.rpartition("=")
        axis = axis.strip()
        if not sep or not glob or not (axis.isdigit() or axis == "rest"):
            raise PolicyError(
                f"--fan-in-axis {spec!r}: expected GLOB=AXIS, AXIS a dim index (0, 1, …) or 'rest'"
            )
        out.append((glob, None if axis == "rest" else int(axis)))
    return tuple(out)


def resolve_axes(
    shapes: Mapping[str, Sequence[int]],
    *,
    model: Mapping[str, int] | None = None,
    config: Mapping[str, int] | None = None,
    overrides: Sequence[tuple[str, int | None]] = (),
) -> dict[str, int]:
    """Each tensor's non-default fan-in axis: the model's, then config.json's, then the last
    matching override (1-d and 0-d tensors never get one; a 2-d axis 1 is the default).

    Raises:
        PolicyError: an override's axis does not exist in a tensor it matches.
    """
    axes: dict[str, int | None] = {}
    for source in (model or {}, config or {}):
        axes.update({n: a for n, a in source.items() if n in shapes})
    for glob, axis in overrides:
        for name, shape in shapes.items():
            if fnmatchcase(name, glob):
                if axis is not None and axis >= len(shape):
                    raise PolicyError(f"--fan-in-axis {glob}={axis}: {name} has only {len(shape)} dims")
                axes[name] = axis
    return {
        n: a
        for n, a in axes.items()
        if a is not None and len(shapes[n]) >= 2 and not (len(shapes[n]) == 2 and a == 1)
    }
