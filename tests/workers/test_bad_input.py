"""Bad input gets a clear error naming the user and example; nothing crashes bare."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from transformers import (
    BertConfig,
    Gemma2Config,
    Gemma3TextConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from prefixfleet.workers.architectures import family_for
from prefixfleet.workers.artifact import ArtifactMeta, deserialize, read_meta, serialize
from prefixfleet.workers.backbone import load_backbone
from prefixfleet.workers.data import Example, encode
from prefixfleet.workers.errors import BackboneMismatch, BadArtifact, BadExample, UnsupportedArchitecture, WorkerError
from prefixfleet.workers.spec import PrefixSpec, TrainConfig
from prefixfleet.workers.trainer import UserRequest, prepare, train_user, train_users
from tests.fixtures.backbones import examples_for


def test_empty_example_list_names_the_user(backbones):
    with pytest.raises(WorkerError, match="user 'carol': no training examples"):
        train_user(backbones["gpt2"], UserRequest("carol", []))


@pytest.mark.parametrize("fields, problem", [
    ({"text": "   "}, "`text` is empty"),
    ({"prompt": "hi"}, "completion"),
    ({"prompt": "hi", "completion": "x", "text": "y"}, "either"),
    ({"text": 3}, "must be a string"),
])
def test_malformed_examples_are_refused(fields, problem):
    with pytest.raises(BadExample, match=problem):
        Example(**fields)


def silent(backbone):
    """`backbone` with a tokenizer that drops the text "∅" entirely."""
    class Silent:
        eos_token_id = backbone.tokenizer.eos_token_id

        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [] if text == "∅" else [5]})()

    return type(backbone)(backbone.name_or_path, backbone.model, Silent(), backbone.family)


def test_text_that_tokenizes_to_nothing_names_user_and_example(backbones):
    with pytest.raises(BadExample, match=r"user 'dan', example 1: the text tokenizes to nothing"):
        encode(silent(backbones["gpt2"]), [Example(text="ok"), Example(text="∅")], user="dan", limit=64)


def test_init_text_that_tokenizes_to_nothing_fails_its_user_before_training(backbones):
    request = UserRequest("ana", examples_for(0, 8), PrefixSpec(init_text="∅"), TrainConfig(steps=2))
    with pytest.raises(WorkerError, match=r"user 'ana': init_text '∅' tokenizes to nothing"):
        prepare(silent(backbones["gpt2"]), request)


@pytest.mark.parametrize("family", ["gpt2", "t5", "bart"])
def test_over_long_example_is_truncated_by_the_stated_policy(backbones, family, caplog):
    backbone = backbones[family]
    long = Example(prompt="p" * 300, completion="c" * 50)
    with caplog.at_level(logging.WARNING):
        encoded, = encode(backbone, [long], user="erin", limit=64)
    assert "user 'erin', example 0" in caplog.text and "truncated" in caplog.text
    if family == "gpt2":
        assert len(encoded.input_ids) == 64
        kept_completion = [t for t in encoded.labels if t != -100]
        assert len(kept_completion) == 51  # the whole completion + EOS; the prompt lost its head
    else:
        assert len(encoded.input_ids) == 64 and len(encoded.labels) == 51


def test_unknown_method_and_bad_settings():
    with pytest.raises(WorkerError, match="unknown method 'lora'"):
        PrefixSpec(method="lora")
    with pytest.raises(WorkerError, match="num_virtual_tokens"):
        PrefixSpec(num_virtual_tokens=0)
    with pytest.raises(WorkerError, match="lr must be positive"):
        TrainConfig(lr=-1.0)


def test_unsupported_architecture_names_the_supported_families():
    with pytest.raises(UnsupportedArchitecture, match="supported families: gpt2.*llama.*t5"):
        family_for(BertConfig())


@pytest.mark.parametrize("config", [
    MistralConfig(sliding_window=64, max_position_embeddings=512),
    Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=1, num_hidden_layers=2),
    Qwen3Config(use_sliding_window=True, sliding_window=64, max_window_layers=0, num_hidden_layers=2),
    MixtralConfig(sliding_window=64, max_position_embeddings=512),
    Phi3Config(sliding_window=64, max_position_embeddings=512),
    Gemma2Config(sliding_window=64, max_position_embeddings=512, num_hidden_layers=2),
    Gemma3TextConfig(sliding_window=64, max_position_embeddings=512, num_hidden_layers=2),
], ids=["mistral", "qwen2", "qwen3", "mixtral", "phi3", "gemma2", "gemma3"])
def test_a_sliding_window_is_refused_in_one_line_naming_the_setting(config):
    with pytest.raises(UnsupportedArchitecture, match=rf"{config.model_type}.*sliding_window=64 .*sliding_window=None"):
        family_for(config)


def test_a_sliding_window_is_refused_at_load_and_a_window_as_long_as_the_context_is_not(backbone_dirs, tmp_path):
    folder = tmp_path / "mistral"
    shutil.copytree(backbone_dirs["mistral"], folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["sliding_window"] is None
    for window, refused in ((config["max_position_embeddings"], False), (16, True)):
        (folder / "config.json").write_text(json.dumps({**config, "sliding_window": window}))
        if refused:
            with pytest.raises(UnsupportedArchitecture, match="sliding_window=16"):
                load_backbone(str(folder))
        else:
            assert load_backbone(str(folder)).family.name == "llama"


def test_prefix_for_another_backbone_is_refused(backbones):
    gpt2, llama = backbones["gpt2"], backbones["llama"]
    spec = PrefixSpec(method="ptuning-v2", num_virtual_tokens=2)
    g = gpt2.stacks["decoder"]
    blob = serialize({"decoder": torch.zeros(g.shape(2))}, ArtifactMeta("ns", "fay", spec, gpt2.fingerprint, "d"))
    assert gpt2.fingerprint != llama.fingerprint
    with pytest.raises(BackboneMismatch, match="user 'fay'"):
        deserialize(blob, backbone_fingerprint=llama.fingerprint)
    assert deserialize(blob, backbone_fingerprint=gpt2.fingerprint)[1].user_id == "fay"


def test_corrupt_artifacts_are_refused():
    with pytest.raises(BadArtifact, match="truncated"):
        read_meta(b"\x01\x02")
    with pytest.raises(BadArtifact, match="not a prefixfleet/1 artifact"):
        from safetensors.torch import save
        read_meta(save({"x": torch.zeros(1)}))


def test_one_bad_user_in_a_batch_does_not_stop_the_others(backbones):
    jobs = [UserRequest("ok", examples_for(0, 8), config=TrainConfig(steps=2)), UserRequest("empty", [])]
    results = train_users(backbones["gpt2"], jobs)
    assert results[0].ok and not results[1].ok and "empty" in results[1].error


def test_a_warm_start_of_the_wrong_shape_fails_its_user_alone(backbones):
    spec = PrefixSpec(method="ptuning-v2", num_virtual_tokens=4)
    wrong = {"decoder": torch.zeros(1, 2, 3, 4, 5)}
    jobs = [UserRequest("ok", examples_for(0, 8), spec, TrainConfig(steps=2)),
            UserRequest("warm", examples_for(1, 8), spec, TrainConfig(steps=2), start=wrong)]
    results = train_users(backbones["gpt2"], jobs)
    assert results[0].ok and not results[1].ok
    assert "user 'warm': warm start does not fit" in results[1].error
