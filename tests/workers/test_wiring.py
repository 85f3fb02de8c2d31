"""One wiring path: what generation serves is what training scores, for every family and method,
and every stack of a prefix (the T5 encoder's included) reaches the training loss."""
from __future__ import annotations

import pytest
import torch

from prefixfleet.workers.data import Batch
from prefixfleet.workers.forward import logits, row_losses
from prefixfleet.workers.generate import generate_ids
from prefixfleet.workers.prefix import UserPrefix
from prefixfleet.workers.spec import METHODS, PrefixSpec
from tests.fixtures.backbones import ENCODER_DECODERS, FAMILIES

PROMPTS = ["order 3 kite for Bo\n", "Dear Ana,", "ship 12 mugs"]


def _prefix(backbone, method: str, seed: int) -> dict[str, torch.Tensor]:
    spec = PrefixSpec(method=method, num_virtual_tokens=5, reparam_hidden=32)
    with torch.no_grad():
        return {k: v.detach() for k, v in UserPrefix(backbone, spec, torch.Generator().manual_seed(seed))().items()}


def _teacher_forced(backbone, prompt: str, generated: list[int]) -> Batch:
    """The batch training would score for `prompt` followed by `generated`."""
    tok = backbone.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    if backbone.family.encoder_decoder:
        ids = torch.tensor([prompt_ids + [tok.eos_token_id]])
        decoder = torch.tensor([[backbone.config.decoder_start_token_id] + generated[:-1]])
        return Batch(ids, torch.ones_like(ids), torch.zeros_like(decoder), decoder, torch.ones_like(decoder))
    ids = torch.tensor([prompt_ids + generated])
    return Batch(ids, torch.ones_like(ids), torch.zeros_like(ids))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_generation_equals_the_argmax_training_scores(backbones, family, method):
    backbone = backbones[family]
    tensors = _prefix(backbone, method, seed=4)
    outputs = generate_ids(backbone, [tensors] * len(PROMPTS), PROMPTS, max_new_tokens=6)
    for prompt, generated in zip(PROMPTS, outputs, strict=True):
        batch = _teacher_forced(backbone, prompt, generated)
        with torch.no_grad():
            scores = logits(backbone, batch, {k: v.unsqueeze(0) for k, v in tensors.items()})[0]
        if not backbone.family.encoder_decoder:  # position i predicts token i + 1
            scores = scores[batch.input_ids.shape[1] - len(generated) - 1:-1]
        assert scores.argmax(-1).tolist() == generated, (prompt, generated)


@pytest.mark.parametrize("family", ENCODER_DECODERS)
@pytest.mark.parametrize("method", ["prefix", "ptuning-v2"])
def test_the_encoder_prefix_reaches_the_training_loss(backbones, method, family):
    backbone = backbones[family]
    tensors = _prefix(backbone, method, seed=2)
    batch = _teacher_forced(backbone, PROMPTS[0], [5, 6, 7, 8])
    batch = Batch(batch.input_ids, batch.attention_mask, torch.tensor([[5, 6, 7, 8]]),
                  batch.decoder_input_ids, batch.decoder_attention_mask)
    encoder = tensors["encoder"].unsqueeze(0).clone().requires_grad_(True)
    rows = {"decoder": tensors["decoder"].unsqueeze(0), "encoder": encoder}
    loss, count = row_losses(backbone, batch, rows)
    loss.sum().backward()
    assert count.item() == 4
    assert encoder.grad is not None and encoder.grad.abs().sum() > 0
    other = {**rows, "encoder": torch.randn_like(encoder)}
    assert not torch.allclose(row_losses(backbone, batch, other)[0], loss)
