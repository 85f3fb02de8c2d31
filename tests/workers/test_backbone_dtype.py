"""The dtype a backbone runs in: float32 unless asked, the checkpoint's own half precision when
serving on an accelerator; and one fingerprint for a checkpoint whatever dtype it was loaded in, so
prefixes trained on a CPU (float32) serve on a GPU (bf16)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixfleet.workers.backbone import checkpoint_dtype, load_backbone
from prefixfleet.workers.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_backbones, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bf16")
    model = AutoModelForCausalLM.from_pretrained(tiny_backbones.path("llama"), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def test_a_half_precision_checkpoint_has_one_fingerprint_in_either_dtype(bf16_checkpoint: Path):
    upcast, native = load_backbone(str(bf16_checkpoint)), load_backbone(str(bf16_checkpoint), dtype=torch.bfloat16)
    assert (upcast.model.dtype, native.model.dtype) == (torch.float32, torch.bfloat16)
    assert upcast.fingerprint == native.fingerprint


def test_a_float32_checkpoint_cut_to_half_precision_is_another_backbone(tiny_backbones):
    path = tiny_backbones.path("llama")
    assert load_backbone(path).fingerprint != load_backbone(path, dtype=torch.bfloat16).fingerprint


def test_serving_asks_for_the_checkpoint_dtype_which_is_float32_on_a_cpu(bf16_checkpoint: Path):
    assert load_backbone(str(bf16_checkpoint), dtype="checkpoint").model.dtype == torch.float32


@pytest.mark.parametrize(("stated", "device", "expected"), [
    (torch.bfloat16, "cuda", torch.bfloat16),
    ("bfloat16", "cuda:1", torch.bfloat16),
    (torch.float16, "cuda", torch.float16),
    (torch.float32, "cuda", torch.float32),
    (None, "cuda", torch.float32),
    (torch.bfloat16, "cpu", torch.float32),
    (torch.bfloat16, None, torch.float32),
])
def test_checkpoint_dtype_is_the_stated_half_precision_on_an_accelerator_only(stated, device, expected):
    assert checkpoint_dtype(SimpleNamespace(dtype=stated), device) == expected
