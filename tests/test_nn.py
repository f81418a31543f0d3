"""pspctl.nn: PSP layers against extraction, Proposition 3, save/load, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pspctl.checkpoints import save_state_dict
from pspctl.contexts import Kind, make_contexts
from pspctl.errors import ContextError, MismatchError, OutputError, PolicyError, ValidationError
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from pspctl.nn import Stacked, Superposed, load, mix_contexts, save, superpose
from pspctl.policy import SHAPE_RULES, Policy
from pspctl.superpose import bind, unbind

K = 3
ALL_WEIGHTS = Policy(superpose=("*weight",))
KINDS = [("binary", False), ("complex", False), ("complex", True), ("onepower", False), ("rotation", False)]


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Unflatten(1, (6, 1)),
        nn.Conv2d(6, 5, (1, 3), stride=(1, 2), groups=1),
        nn.BatchNorm2d(5),
        nn.Flatten(),
        nn.Linear(5 * 3, 12),
        nn.LayerNorm(12),
        nn.Linear(12, 4),
    )


def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize(("kind", "mixture"), KINDS)
def test_forward_equals_extracted_model(tmp_path, kind, mixture):
    torch.manual_seed(0)
    psp = superpose(conv_net(), K, kind=kind, seed=3, policy=ALL_WEIGHTS, mixture=mixture)
    _perturb(psp, 1)  # every context differs from the initialisation
    x = torch.randn(7, 2, 8)
    for k in range(K):  # give every context its own BatchNorm statistics
        with psp.context(k):
            psp(x + k)
    psp.eval()
    save(psp, tmp_path / "w.safetensors")
    file = SuperposedFile(tmp_path / "w.safetensors")
    assert file.kind is (Kind.COMPLEX if mixture else Kind(kind))
    assert set(file.names(role="superposed")) == {"0.weight", "3.weight", "6.weight", "8.weight"}
    outputs = []
    for k in range(K):
        plain = conv_net()
        plain.load_state_dict(file.state_dict(k))
        plain.eval()
        with psp.context(k):
            y = psp(x)
        torch.testing.assert_close(y, plain(x), atol=2e-5, rtol=1e-4)
        outputs.append(y)
    assert not torch.allclose(outputs[0], outputs[1])  # the contexts really are different models
    reloaded = load(tmp_path / "w.safetensors", conv_net()).eval()
    with reloaded.context(2), psp.context(2):
        torch.testing.assert_close(reloaded(x), psp(x))


def test_context_zero_starts_as_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 16)
    for kind in Kind:
        psp = superpose(model, 4, kind=kind, policy=ALL_WEIGHTS)
        torch.testing.assert_close(psp(x), model(x), atol=1e-5, rtol=1e-5)
        with psp.context(1):
            assert not torch.allclose(psp(x), model(x), atol=1e-3)


def test_same_policy_and_contexts_as_merge(tmp_path):
    """A superposed file from pspctl.nn and one from merge agree on roles and contexts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    psp = superpose(model, 2, kind="binary", seed=5)
    save(psp, tmp_path / "nn.safetensors")
    for k in range(2):
        save_state_dict(psp.state_dict_for(k), tmp_path / f"m{k}.safetensors")
    merge([tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], tmp_path / "merged.safetensors",
          MergeOptions(base="none", kind="binary", seed=5, policy=SHAPE_RULES))  # fmt: skip
    ours, theirs = (
        SuperposedFile(tmp_path / "nn.safetensors"),
        SuperposedFile(tmp_path / "merged.safetensors"),
    )
    # Merge also stores once what is equal in every input (nn has no inputs to compare).
    merged_roles = {
        n: "per_context" if m.role == "shared" else m.role for n, m in theirs.header.tensors.items()
    }
    assert {n: m.role for n, m in ours.header.tensors.items()} == merged_roles
    assert ours.names(role="superposed") == ["0.weight", "2.weight"]  # the head is under min_share
    for name in ours.names(role="superposed"):
        assert torch.equal(ours.contexts(name).data, theirs.contexts(name).data)


def test_mixture_averages_neighbouring_phases():
    ctx = make_contexts("complex", 4, 5, seed=0, name="w")
    mixed = mix_contexts(ctx)
    phi = ctx.data.double()
    expected = torch.stack([(phi[0] + phi[1]) / 2, phi[0:3].mean(0), phi[1:4].mean(0), (phi[2] + phi[3]) / 2])
    torch.testing.assert_close(mixed.data, expected.float())
    with pytest.raises(ValueError, match="complex"):
        mix_contexts(make_contexts("binary", 4, 5, seed=0))


def _unbound_gradient(kind: Kind, weights: list[torch.Tensor], x, t, k: int, seed: int):
    """Train context k of a PSP layer one step: (unbound PSP gradient, the retrieved weight Ŵ_k)."""
    ctx = make_contexts(kind, len(weights), weights[0].shape[1], seed, "w")
    layer = Superposed(ctx, bind(weights, ctx))
    loss = 0.5 * (layer.linear(x, k) - t).pow(2).sum()
    loss.backward()
    grad = torch.complex(layer.real.grad, layer.imag.grad) if kind.is_complex else layer.weight.grad
    return unbind(grad, ctx, k), layer.retrieve(k).detach()


def _standalone_gradient(w: torch.Tensor, x, t) -> torch.Tensor:
    w = w.clone().requires_grad_(True)
    (0.5 * (F.linear(x, w) - t).pow(2).sum()).backward()
    assert w.grad is not None
    return w.grad


@pytest.mark.parametrize("kind", [Kind.BINARY, Kind.COMPLEX, Kind.ROTATION])
def test_proposition_3_gradient(kind):
    """∂J_PSP/∂W, unbound with context k, is model k's own gradient: exactly at Ŵ_k, and
    in expectation over the contexts at the stored W_k (Propositions 1 and 3)."""
    gen = torch.Generator().manual_seed(0)
    N, M, B, k = 5, 128, 6, 1
    weights = [torch.randn(N, M, generator=gen) / M**0.5 for _ in range(4)]
    x, t = torch.randn(B, M, generator=gen), torch.randn(B, N, generator=gen)

    unbound, w_hat = _unbound_gradient(kind, weights, x, t, k, seed=0)
    torch.testing.assert_close(unbound, _standalone_gradient(w_hat, x, t), atol=1e-5, rtol=1e-4)

    true = _standalone_gradient(weights[k], x, t)
    draws = torch.stack([_unbound_gradient(kind, weights, x, t, k, seed=s)[0] for s in range(64)])
    single_error = ((draws - true).norm(dim=(1, 2)) / true.norm()).mean()
    mean_error = (draws.mean(0) - true).norm() / true.norm()
    assert single_error > 0.05  # one draw is noisy...
    assert mean_error < single_error / 4  # ...but unbiased: averaging 64 draws shrinks it ~8×


def test_inactive_contexts_get_no_gradient():
    psp = superpose(nn.Sequential(nn.Linear(4, 3)), K, policy=ALL_WEIGHTS)
    with psp.context(1):
        psp(torch.randn(2, 4)).sum().backward()
    bias = psp.tensors["0.bias"]
    assert isinstance(bias, Stacked)
    assert [p.grad is not None for p in bias.items] == [False, True, False]
    assert psp.tensors["0.weight"].weight.grad is not None


class TokenNet(nn.Module):
    """torchvision's VisionTransformer in miniature: the class token sits on the root and the
    position embedding on the encoder, each beside submodules."""

    def __init__(self):
        super().__init__()
        self.class_token = nn.Parameter(torch.randn(1, 1, 16))
        self.proj = nn.Linear(8, 16)
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, 6, 16))
        self.encoder.register_buffer("scale", torch.tensor(0.5))
        self.encoder.block = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.class_token.expand(len(x), -1, -1), self.proj(x)], 1)
        h = h + self.encoder.pos_embedding * self.encoder.scale
        return self.head((h + self.encoder.block(h))[:, 0])


def test_a_module_owning_tensors_beside_submodules(tmp_path):
    """Its own tensors are context k's at each forward, train, save and load like any other."""
    torch.manual_seed(0)
    policy = Policy(superpose=("*weight", "encoder.pos_embedding"), keep=("class_token",))
    psp = superpose(TokenNet(), K, seed=2, policy=policy)
    _perturb(psp, 1)
    x = torch.randn(4, 5, 8)
    with psp.context(1):
        psp(x).square().sum().backward()
    token = psp.tensors["class_token"]
    assert isinstance(token, Stacked)
    assert [p.grad is not None for p in token.items] == [False, True, False]
    save(psp, tmp_path / "w.safetensors")
    file = SuperposedFile(tmp_path / "w.safetensors")
    assert file.header.tensors["encoder.pos_embedding"].role == "superposed"
    assert psp.tensors["encoder.pos_embedding"].weight.grad is not None
    reloaded = load(tmp_path / "w.safetensors", TokenNet())
    twin = copy.deepcopy(reloaded)
    outputs = []
    for k in range(K):
        plain = TokenNet()
        plain.load_state_dict(file.state_dict(k))
        torch.testing.assert_close(file.state_dict(k)["class_token"], token.items[k].detach())
        with psp.context(k), reloaded.context(k), twin.context(k):
            y = psp(x)
            torch.testing.assert_close(y, plain(x), atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(reloaded(x), y)
            torch.testing.assert_close(twin(x), y)
        outputs.append(y)
    assert not torch.allclose(outputs[0], outputs[1])
    with torch.no_grad():  # the copy holds tensors of its own
        twin.tensors["class_token"].items[0].add_(1.0)
    assert not torch.allclose(twin(x), reloaded(x))


class AttentionNet(nn.Module):
    """A parent reading its children's weights: nn.MultiheadAttention reads `out_proj.weight`
    (and owns `in_proj_weight` beside it), the head reads the embedding's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        return F.linear(h[:, 0], self.embed.weight)


def test_a_parent_reading_its_childrens_weights_gets_the_active_contexts(tmp_path):
    torch.manual_seed(0)
    psp = superpose(AttentionNet(), K, seed=1, policy=ALL_WEIGHTS)
    _perturb(psp, 2)
    x = torch.randint(0, 10, (3, 5))
    save(psp, tmp_path / "w.safetensors")
    file = SuperposedFile(tmp_path / "w.safetensors")
    for k in range(K):
        plain = AttentionNet()
        plain.load_state_dict(file.state_dict(k))
        with psp.context(k):
            torch.testing.assert_close(psp(x), plain(x), atol=2e-5, rtol=1e-4)
    with psp.context(1):
        psp(x).square().sum().backward()
    for name in ("attn.out_proj.weight", "attn.in_proj_weight", "embed.weight"):  # read by a parent
        assert any(p.grad is not None for p in psp.tensors[name].parameters()), name


def test_a_shared_tensor_trained_apart_is_saved_per_context_and_says_why(tmp_path):
    torch.manual_seed(0)
    models = [conv_net() for _ in range(K)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
        _perturb(m[0], len(m))  # the first conv differs; the BatchNorm's statistics do not
    paths = [tmp_path / f"m{k}.safetensors" for k in range(K)]
    for m, path in zip(models, paths, strict=True):
        save_state_dict(m.state_dict(), path)
    merge(paths, tmp_path / "w.safetensors", MergeOptions(base="none"))
    merged = SuperposedFile(tmp_path / "w.safetensors")
    assert merged.header.tensors["4.running_mean"].role == "shared"
    psp = load(tmp_path / "w.safetensors", conv_net())
    for k in range(K):  # each context's batches move its own running statistics
        with psp.context(k):
            psp(torch.randn(4, 2, 8) + k)
    save(psp, tmp_path / "t.safetensors")
    meta = SuperposedFile(tmp_path / "t.safetensors").header.tensors["4.running_mean"]
    assert (meta.role, meta.reason) == ("per_context", "equal in every input, then trained apart")


def test_bad_input(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(PolicyError, match="mixture of contexts needs --kind complex"):
        superpose(model, K, kind="binary", mixture=True)
    with pytest.raises(PolicyError, match="unknown kind 'ternary'"):
        superpose(model, K, kind="ternary")
    psp = superpose(model, K, policy=ALL_WEIGHTS)
    with pytest.raises(ContextError, match=r"context 3 out of range: this model holds contexts 0\.\.2"):
        psp.set_context(3)
    with pytest.raises(OutputError, match=r"w\.pt: a superposed file is a safetensors file"):
        save(psp, tmp_path / "w.pt")
    save(psp, tmp_path / "w.safetensors")
    with pytest.raises(
        MismatchError,
        match=r"does not fit the given model: other shape: 0\.weight \[3, 4\] \(model: \[3, 5\]\)",
    ):
        load(tmp_path / "w.safetensors", nn.Sequential(nn.Linear(5, 3)))
    with torch.no_grad():
        psp.tensors["0.bias"].items[2].fill_(float("nan"))
    with pytest.raises(ValidationError, match="0.bias has NaN/Inf values; refusing to write"):
        save(psp, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "w.safetensors"]
