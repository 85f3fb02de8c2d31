"""PEFT adapter round-trip: our prefix ⇄ an adapter directory that `peft.PeftModel.from_pretrained`
loads (adapter_config.json + adapter_model.safetensors holding `prompt_embeddings`).

PEFT's layout for prefix tuning is `[P, L·2·kv_heads·head_dim]` ordered (layer, key/value, head,
dim) — ours is `[L, 2, kv_heads, P, head_dim]`, the same numbers permuted. PEFT reaches only a
decoder, so encoder-decoder deep prefixes (which carry an encoder side) are not exportable.
Written without importing peft: the files are plain JSON and safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.prefix import PrefixTensors, check_shapes, expected_shapes
from prefixfleet.workers.spec import PrefixSpec

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def export_peft(backbone: Backbone, tensors: PrefixTensors, spec: PrefixSpec, out_dir: str | Path) -> Path:
    """Write a PEFT adapter directory for `backbone` (deep → PREFIX_TUNING, prompt → PROMPT_TUNING)."""
    check_shapes(tensors, expected_shapes(backbone, spec))
    P = spec.num_virtual_tokens
    task = "SEQ_2_SEQ_LM" if backbone.family.encoder_decoder else "CAUSAL_LM"
    config = {
        "task_type": task, "num_virtual_tokens": P, "num_transformer_submodules": 1,
        "base_model_name_or_path": backbone.name_or_path, "inference_mode": True, "revision": None,
    }
    if spec.method == "prompt":
        if backbone.family.encoder_decoder:
            raise WorkerError("PEFT prompt tuning on encoder-decoder models puts the prompt on both sides; "
                              "an encoder-only soft prompt cannot be exported")
        weights = tensors["prompt"]
        config.update(peft_type="PROMPT_TUNING", token_dim=backbone.hidden_size, prompt_tuning_init="RANDOM",
                      num_layers=backbone.stacks["decoder"].layers, num_attention_heads=backbone.config.num_attention_heads)
    else:
        if "encoder" in tensors:
            raise WorkerError("PEFT's prefix tuning never reaches an encoder (PEFT issue #1188): "
                              "an encoder-decoder prefix cannot be exported without losing its encoder side")
        geometry = backbone.stacks["decoder"]
        weights = tensors["decoder"].permute(3, 0, 1, 2, 4).reshape(P, -1)
        config.update(peft_type="PREFIX_TUNING", token_dim=geometry.kv_heads * geometry.head_dim,
                      num_attention_heads=geometry.kv_heads, num_layers=geometry.layers,
                      prefix_projection=False, encoder_hidden_size=geometry.kv_heads * geometry.head_dim)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({"prompt_embeddings": weights.detach().float().contiguous()}, str(out / WEIGHTS_FILE))
    return out


def read_peft_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise WorkerError(f"{adapter_dir}: no {CONFIG_FILE}; not a PEFT adapter directory")
    return json.loads(path.read_text())


def import_peft(backbone: Backbone, adapter_dir: str | Path) -> tuple[PrefixTensors, PrefixSpec]:
    """Our tensors and spec from a PEFT prefix-tuning or prompt-tuning adapter made for `backbone`."""
    config = read_peft_config(adapter_dir)
    kind = config.get("peft_type")
    weights_path = Path(adapter_dir) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise WorkerError(f"{adapter_dir}: no {WEIGHTS_FILE}")
    weights = load_file(str(weights_path)).get("prompt_embeddings")
    if weights is None:
        raise WorkerError(f"{weights_path}: no `prompt_embeddings` tensor")
    P = int(config["num_virtual_tokens"])
    if kind == "PROMPT_TUNING":
        spec, tensors = PrefixSpec(method="prompt", num_virtual_tokens=P), {"prompt": weights[:P].float()}
    elif kind == "PREFIX_TUNING":
        if backbone.family.encoder_decoder:
            raise WorkerError("importing PEFT prefix tuning into an encoder-decoder backbone is not supported")
        spec = PrefixSpec(method="ptuning-v2", num_virtual_tokens=P)
        g = backbone.stacks["decoder"]
        declared = (config.get("num_layers"), config.get("num_attention_heads"), config.get("token_dim"))
        if declared != (g.layers, g.kv_heads, g.kv_heads * g.head_dim) or weights.shape != (P, g.numel(P) // P):
            raise WorkerError(f"adapter (layers, kv heads, token_dim) {declared} and prompt_embeddings "
                              f"{tuple(weights.shape)} do not fit this backbone: expected "
                              f"{(g.layers, g.kv_heads, g.kv_heads * g.head_dim)} and {(P, g.numel(P) // P)}")
        decoder = weights.float().reshape(P, g.layers, 2, g.kv_heads, g.head_dim).permute(1, 2, 3, 0, 4)
        tensors = {"decoder": decoder.contiguous()}
    else:
        raise WorkerError(f"PEFT adapter type {kind!r} is not a prefix or prompt adapter")
    check_shapes(tensors, expected_shapes(backbone, spec))
    return tensors, spec


