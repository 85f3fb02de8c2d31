"""Export to a PEFT adapter that peft.PeftModel loads and that gives our logits; import back."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from prefixfleet.workers.backbone import load_backbone
from prefixfleet.workers.data import collate, encode
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.forward import logits
from prefixfleet.workers.peft_interop import export_peft, import_peft
from prefixfleet.workers.prefix import UserPrefix
from prefixfleet.workers.spec import PrefixSpec
from tests.fixtures.backbones import ENCODER_DECODERS, FAMILIES, examples_for
from tests.fixtures.peft_logits import peft_logits


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ENCODER_DECODERS])
@pytest.mark.parametrize("method", ["prefix", "ptuning-v2", "prompt"])
def test_peft_export_gives_identical_logits(backbone_dirs, tmp_path, family, method):
    ours = load_backbone(backbone_dirs[family])
    spec = PrefixSpec(method=method, num_virtual_tokens=5, reparam_hidden=32)
    with torch.no_grad():
        tensors = {k: v.detach() for k, v in UserPrefix(ours, spec, torch.Generator().manual_seed(3))().items()}
    adapter = export_peft(ours, tensors, spec, tmp_path / "adapter")

    base = load_backbone(backbone_dirs[family]).model
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    batch = collate(ours, encode(ours, examples_for(1, 3), user="u", limit=128))
    with torch.no_grad():
        expected = logits(ours, batch, {k: v.unsqueeze(0).expand(batch.size, *v.shape) for k, v in tensors.items()})
    got = peft_logits(peft_model, batch)
    if method == "prompt":
        got = got[:, spec.num_virtual_tokens:]
    mask = batch.attention_mask.bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5, rtol=1e-5)

    back, back_spec = import_peft(ours, adapter)
    assert back_spec.num_virtual_tokens == 5
    for name in tensors:
        assert torch.allclose(back[name], tensors[name])


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_encoder_decoder_deep_prefix_is_not_exported(backbones, tmp_path, family):
    backbone = backbones[family]
    spec = PrefixSpec(method="ptuning-v2", num_virtual_tokens=3)
    tensors = UserPrefix(backbone, spec, torch.Generator().manual_seed(0))()
    with pytest.raises(WorkerError, match="encoder"):
        export_peft(backbone, {k: v.detach() for k, v in tensors.items()}, spec, tmp_path / "a")


def test_import_refuses_an_adapter_for_another_geometry(backbones, tmp_path):
    gpt2, llama = backbones["gpt2"], backbones["llama"]
    spec = PrefixSpec(method="ptuning-v2", num_virtual_tokens=3)
    tensors = {k: v.detach() for k, v in UserPrefix(gpt2, spec, torch.Generator().manual_seed(0))().items()}
    adapter = export_peft(gpt2, tensors, spec, tmp_path / "a")
    with pytest.raises(WorkerError, match="do not fit"):
        import_peft(llama, adapter)
    with pytest.raises(WorkerError, match="not a PEFT adapter"):
        import_peft(gpt2, tmp_path)
