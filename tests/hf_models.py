"""Tiny real architectures for the HF and architecture tests: built here, nothing downloaded.

Each builder returns (model factory, example inputs). `finetunes` makes K "fine-tunes" of one
parent: the parent plus a small random delta on every floating tensor, as fine-tuning gives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tests.archs import mobilenet_v3_small, resnet18

Builder = Callable[[], nn.Module]


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # no progress bars or notices in the test output
    transformers.utils.logging.disable_progress_bar()
    return transformers


def gpt2() -> tuple[Builder, tuple[torch.Tensor, ...]]:
    t = _transformers()
    cfg = t.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, use_cache=False)
    return (lambda: t.GPT2LMHeadModel(cfg)), (torch.randint(0, 64, (2, 16), generator=_gen()),)


def llama(tied: bool) -> tuple[Builder, tuple[torch.Tensor, ...]]:
    t = _transformers()
    cfg = t.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, use_cache=False,
    )  # fmt: skip
    return (lambda: t.LlamaForCausalLM(cfg)), (torch.randint(0, 64, (2, 16), generator=_gen()),)


def bert() -> tuple[Builder, tuple[torch.Tensor, ...]]:
    t = _transformers()
    cfg = t.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    return (lambda: t.BertForSequenceClassification(cfg)), (torch.randint(0, 64, (2, 16), generator=_gen()),)


def vit() -> tuple[Builder, tuple[torch.Tensor, ...]]:
    t = _transformers()
    cfg = t.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return (lambda: t.ViTForImageClassification(cfg)), (torch.randn(2, 3, 16, 16, generator=_gen()),)


def resnet() -> tuple[Builder, tuple[torch.Tensor, ...]]:
    return (lambda: resnet18(10, width=0.125)), (torch.randn(2, 3, 32, 32, generator=_gen()),)


def mobilenet() -> tuple[Builder, tuple[torch.Tensor, ...]]:
    return (lambda: mobilenet_v3_small(10, width=0.25)), (torch.randn(2, 3, 32, 32, generator=_gen()),)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def finetunes(build: Builder, K: int = 4, scale: float = 0.05, seed: int = 0) -> list[nn.Module]:
    """K copies of one parent, each with its own delta of `scale` × the tensor's mean magnitude."""
    torch.manual_seed(seed)
    parent = build().eval()
    out = []
    for k in range(K):
        model = build().eval()
        model.load_state_dict(parent.state_dict())
        gen = torch.Generator().manual_seed(seed * 100 + k + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
        out.append(model)
    return out


def tokenizer(vocab_size: int = 64):
    """A WordLevel tokenizer over `w0 … wN`, wrapped for save_pretrained (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = _transformers()
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]"] + [f"w{i}" for i in range(vocab_size - 2)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return t.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def save_lightning(model: nn.Module, path: Path, prefix: str = "model.") -> Path:
    """A Lightning-style checkpoint: the LightningModule's keys carry its attribute prefix."""
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {prefix + k: v for k, v in model.state_dict().items()},
            "optimizer_states": [],
            "lr_schedulers": [],
        },
        path,
    )
    return path


@torch.no_grad()
def outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = model.eval()(*inputs)
    return (out.logits if hasattr(out, "logits") else out).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
