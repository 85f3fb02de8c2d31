"""The frozen, shared backbone: loading (any HF id or local path), freezing, fingerprinting."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from prefixfleet.workers.architectures import Family, StackGeometry, family_for, install_encoder_hooks


@dataclass
class Backbone:
    """A loaded model + tokenizer, frozen: no parameter requires grad, dropout off, eval mode."""

    name_or_path: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    family: Family

    @property
    def config(self):
        return self.model.config

    @property
    def stacks(self) -> dict[str, StackGeometry]:
        return self.family.stacks(self.config)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """The model's context length, when the config states one (T5's relative bias has none)."""
        for name in ("n_positions", "max_position_embeddings"):
            if (value := getattr(self.config, name, None)) is not None:
                return int(value)
        return None

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over config, weights and tokenizer: a prefix is bound to exactly this backbone."""
        digest = hashlib.sha256()
        config = self.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
            config.pop(volatile, None)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        digest.update(weights_checksum(self.model).encode())
        vocab = self.tokenizer.get_vocab()
        digest.update(json.dumps(sorted(vocab.items()), separators=(",", ":")).encode())
        digest.update(json.dumps(self.tokenizer.all_special_tokens).encode())
        return digest.hexdigest()


def weights_checksum(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in name order, bit for bit. Floating-point tensors are
    hashed as float32, which holds bf16 and fp16 values exactly: a checkpoint has one checksum
    whether it was loaded in its own half precision (on a GPU) or upcast to float32 (on a CPU)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            tensor = tensor.float()
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


HALF_PRECISIONS = (torch.bfloat16, torch.float16)


def checkpoint_dtype(config, device: str | torch.device | None) -> torch.dtype:
    """The dtype to run a checkpoint in: its own half precision (bf16/fp16) on an accelerator, float32
    on a CPU (whose half-precision matmuls are slow) or when the checkpoint states no half precision."""
    if device is None or torch.device(device).type == "cpu":
        return torch.float32
    stated = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stated, str):
        stated = getattr(torch, stated, None)
    return stated if stated in HALF_PRECISIONS else torch.float32


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_backbone(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | Literal["checkpoint"] | None = None,
    attn_implementation: str | None = None,
) -> Backbone:
    """Load any supported HF model id or local save_pretrained directory, frozen, in `dtype`: float32
    when None; "checkpoint": `checkpoint_dtype` (what serving asks for).

    Attention defaults to `eager` on CPU: there every row's result is independent of the other
    rows and of padding, bit for bit (SDPA's fused CPU kernel rounds differently with the padded
    length), at no cost in speed on small models. On accelerators transformers' default (SDPA)
    is kept; packed and alone then agree within float tolerance.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    family = family_for(config)
    auto = AutoModelForSeq2SeqLM if family.encoder_decoder else AutoModelForCausalLM
    on_cpu = device is None or torch.device(device).type == "cpu"
    attention = attn_implementation or ("eager" if on_cpu else None)
    if dtype == "checkpoint":
        dtype = checkpoint_dtype(config, device)
    model = auto.from_pretrained(name_or_path, dtype=dtype or torch.float32, attn_implementation=attention)
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    freeze(model)
    install_encoder_hooks(family, model)
    return Backbone(name_or_path=str(name_or_path), model=model, tokenizer=tokenizer, family=family)
