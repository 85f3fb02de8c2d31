"""Each method × each family trains below the no-prefix baseline, generates, and round-trips
through safetensors; the backbone is never modified (invariant 6)."""
from __future__ import annotations

import json

import pytest
import torch

from prefixfleet.workers.artifact import ArtifactMeta, deserialize, serialize
from prefixfleet.workers.backbone import weights_checksum
from prefixfleet.workers.data import Example, collate, data_fingerprint, encode, holdout
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.forward import logits
from prefixfleet.workers.generate import generate
from prefixfleet.workers.spec import METHODS, PrefixSpec, TrainConfig
from prefixfleet.workers.trainer import UserRequest, train_user
from tests.fixtures.backbones import ENCODER_DECODERS, FAMILIES, examples_for

CONFIG = TrainConfig(steps=30, batch_size=8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_generates_and_round_trips(backbones, family, method):
    backbone = backbones[family]
    before = weights_checksum(backbone.model)
    examples = examples_for(3)
    spec = PrefixSpec(method=method, num_virtual_tokens=6, reparam_hidden=64)
    result = train_user(backbone, UserRequest("alice", examples, spec, CONFIG))

    assert result.eval_loss < result.baseline_eval_loss - 0.3, (result.eval_loss, result.baseline_eval_loss)
    assert len(result.loss_curve) == CONFIG.steps
    assert all(not p.requires_grad for p in backbone.model.parameters())
    assert weights_checksum(backbone.model) == before

    meta = ArtifactMeta("ns", "alice", spec, backbone.fingerprint, data_fingerprint(examples))
    blob = serialize(result.tensors, meta)
    tensors, loaded = deserialize(blob, backbone_fingerprint=backbone.fingerprint)
    assert loaded == ArtifactMeta("ns", "alice", spec, backbone.fingerprint, data_fingerprint(examples), loaded.created_at)
    assert tensors.keys() == result.tensors.keys()
    for name in tensors:
        assert torch.equal(tensors[name], result.tensors[name])

    prompt = ["order 3 kite for Bo\n"]
    greedy = generate(backbone, [tensors], prompt, max_new_tokens=8)
    # the trained prefix changes what the model predicts (greedy text may still agree on a tiny model)
    batch = collate(backbone, encode(backbone, examples[:2], user="alice", limit=64))
    with torch.no_grad():
        rows = {k: v.unsqueeze(0).expand(batch.size, *v.shape) for k, v in tensors.items()}
        assert not torch.allclose(logits(backbone, batch, rows), logits(backbone, batch, None), atol=1e-3)
    assert greedy == generate(backbone, [tensors], prompt, max_new_tokens=8)
    sampled = generate(backbone, [tensors], prompt, max_new_tokens=8, do_sample=True, seed=0)
    assert sampled == generate(backbone, [tensors], prompt, max_new_tokens=8, do_sample=True, seed=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_storage_size_and_dtypes(backbones, dtype):
    backbone = backbones["llama"]
    spec = PrefixSpec(method="ptuning-v2", num_virtual_tokens=16, dtype=dtype)
    g = backbone.stacks["decoder"]
    tensors = {"decoder": torch.randn(g.shape(16))}
    blob = serialize(tensors, ArtifactMeta("ns", "u", spec, backbone.fingerprint, "d" * 64))
    raw = g.numel(16) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert len(blob) <= 1.01 * raw + 1024
    loaded, _ = deserialize(blob)
    assert torch.allclose(loaded["decoder"], tensors["decoder"], atol=0.02, rtol=0.01)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_text_init_starts_from_real_token_activations_and_trains(backbones, family, method):
    """`train --init text:"…"`: every method of every family starts exactly at the frozen model's
    own view of those tokens (`prefix` too: base + MLP(E) with the MLP's last layer at zero)."""
    from prefixfleet.workers.architectures import text_activations
    from prefixfleet.workers.prefix import UserPrefix, initial_tensors

    backbone = backbones[family]
    spec = PrefixSpec(method=method, num_virtual_tokens=5, reparam_hidden=32, init_text="Dear Ana")
    ids = backbone.tokenizer("Dear Ana", add_special_tokens=False).input_ids
    ids = torch.tensor((ids * 5)[:5])
    if method == "prompt":
        expected = {"prompt": backbone.model.get_input_embeddings()(ids)}
    else:
        expected = text_activations(backbone.family, backbone.model, ids)
    started = UserPrefix(backbone, spec, torch.Generator().manual_seed(0))()
    assert started.keys() == expected.keys() == initial_tensors(backbone, spec, torch.Generator()).keys()
    for name, value in expected.items():
        assert torch.equal(started[name].detach(), value.detach())
    result = train_user(backbone, UserRequest("ana", examples_for(2), spec, CONFIG))
    assert result.eval_loss < result.baseline_eval_loss


def test_warm_start_continues_from_an_earlier_prefix(backbones):
    backbone = backbones["gpt2"]
    spec = PrefixSpec(method="prefix", num_virtual_tokens=6, reparam_hidden=64)
    first = train_user(backbone, UserRequest("bob", examples_for(5), spec, CONFIG))
    warm = train_user(backbone, UserRequest("bob", examples_for(5), spec, TrainConfig(steps=1, lr=1e-9), start=first.tensors))
    assert warm.eval_loss == pytest.approx(first.eval_loss, abs=1e-3)


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_the_encoder_prefix_changes_the_encoder_output(backbones, family):
    backbone = backbones[family]
    from prefixfleet.workers.architectures import encoder_prefix
    ids = backbone.tokenizer(["order 3 kite for Bo"], return_tensors="pt").input_ids
    encoder = backbone.model.get_encoder()
    g = backbone.stacks["encoder"]
    plain = encoder(input_ids=ids).last_hidden_state
    outs = []
    for seed in (0, 1):
        rows = torch.randn((1, *g.shape(4)), generator=torch.Generator().manual_seed(seed))
        with encoder_prefix(rows):
            outs.append(encoder(input_ids=ids).last_hidden_state)
    assert outs[0].shape == plain.shape
    assert not torch.allclose(outs[0], plain)
    assert not torch.allclose(outs[0], outs[1])
    assert torch.equal(encoder(input_ids=ids).last_hidden_state, plain)  # hooks inactive outside the block


def test_precision_joins_the_settings_identity_only_when_set_away_from_float32():
    """Adding the setting must not change the identity of every prefix trained before it existed."""
    default = TrainConfig(steps=5)
    assert "precision" not in json.loads(default.settings_json("prefix"))
    mixed = TrainConfig(steps=5, precision="bfloat16")
    assert json.loads(mixed.settings_json("prefix"))["precision"] == "bfloat16"
    with pytest.raises(WorkerError, match="unknown precision 'fp8'"):
        TrainConfig(precision="fp8")


def test_holdout_keeps_both_sides_whatever_the_examples_repeat():
    distinct = [Example(prompt=f"p{i}", completion=f"c{i}") for i in range(40)]
    train, evals = holdout(distinct, 0.2)
    assert evals and train and len(train) + len(evals) == 40
    assert holdout(list(reversed(distinct)), 0.2) == (train, evals)  # by content, not file order
    one = Example(prompt="p", completion="c")
    for repeated in ([one] * 5, [Example(prompt="p", completion="c") for _ in range(5)]):
        train, evals = holdout(repeated, 0.2)
        assert len(train) >= 1 and len(evals) >= 1 and len(train) + len(evals) == 5
