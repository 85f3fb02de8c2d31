"""A user's trainable prefix: its parameters, its initialization, and the tensors it yields.

The tensors a prefix yields are what an artifact stores and what the model reads:
`{"encoder"?, "decoder": [L, 2, H, P, D]}` for deep methods, `{"prompt": [P, hidden]}` for prompt
tuning. `stack_rows` gathers them into a batch where each row carries its own user's prefix.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from prefixfleet.workers.architectures import prompt_activations, text_activations
from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.spec import PrefixSpec

PrefixTensors = dict[str, torch.Tensor]

RANDOM_INIT_STD = 0.5


def init_tokens(backbone: Backbone, text: str, length: int) -> torch.Tensor:
    """`length` token ids of `text`, repeated as needed (paper §7: real words beat random init)."""
    ids = backbone.tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise WorkerError(f"init_text {text!r} tokenizes to nothing")
    return torch.tensor((ids * (length // len(ids) + 1))[:length], device=backbone.device)


def initial_tensors(backbone: Backbone, spec: PrefixSpec, generator: torch.Generator) -> PrefixTensors:
    """Where a fresh prefix starts: real-token activations when `spec.init_text` is set, else random."""
    P = spec.num_virtual_tokens
    if spec.init_text is not None:
        ids = init_tokens(backbone, spec.init_text, P)
        if spec.method == "prompt":
            return {"prompt": backbone.model.get_input_embeddings()(ids).detach().float().cpu()}
        acts = text_activations(backbone.family, backbone.model, ids)
        return {stack: value.float().cpu() for stack, value in acts.items()}
    if spec.method == "prompt":
        vocab = backbone.model.get_input_embeddings().weight  # Lester: sampled vocabulary embeddings
        ids = torch.randint(0, vocab.shape[0], (P,), generator=generator)
        return {"prompt": vocab[ids.to(vocab.device)].detach().float().cpu()}
    return {
        stack: torch.randn(geometry.shape(P), generator=generator) * RANDOM_INIT_STD
        for stack, geometry in backbone.stacks.items()
    }


class UserPrefix(nn.Module):
    """One user's trainable parameters.

    `prefix` trains `base + MLP(E)` (Li & Liang §4.3: Embedding → Linear → Tanh → Linear). For a
    random start the MLP alone draws the prefix; for a text or warm start `base` holds the starting
    tensors and the MLP's last layer starts at zero, so training begins exactly there. Only the
    resulting tensors are kept: the MLP is dropped after training. `ptuning-v2` and `prompt`
    train the tensors directly.
    """

    def __init__(self, backbone: Backbone, spec: PrefixSpec, generator: torch.Generator,
                 start: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.shapes = {k: tuple(v) for k, v in expected_shapes(backbone, spec).items()}
        if start is not None:
            check_shapes(start, self.shapes)
        fresh = start is None and spec.init_text is None
        initial = dict(start) if start is not None else initial_tensors(backbone, spec, generator)
        if spec.method != "prefix":
            self.tensors = nn.ParameterDict({k: nn.Parameter(v.detach().clone().float()) for k, v in initial.items()})
            return
        P, hidden, width = spec.num_virtual_tokens, backbone.hidden_size, spec.reparam_hidden
        self.out_sizes = {k: v.numel() // P for k, v in initial.items()}
        self.embedding = nn.Parameter(torch.randn(P, hidden, generator=generator))
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.Tanh(), nn.Linear(width, sum(self.out_sizes.values())))
        with torch.no_grad():
            for layer in (self.mlp[0], self.mlp[2]):
                bound = 1.0 / layer.in_features ** 0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
            if not fresh:
                self.mlp[2].weight.zero_()
                self.mlp[2].bias.zero_()
        base = {k: torch.zeros_like(v) for k, v in initial.items()} if fresh else initial
        for name, value in base.items():
            self.register_buffer(f"base_{name}", value.detach().clone().float())

    def forward(self) -> PrefixTensors:
        """The prefix tensors (differentiable)."""
        if self.spec.method != "prefix":
            return dict(self.tensors.items())
        flat = self.mlp(self.embedding)  # [P, sum(out_sizes)]
        out, start = {}, 0
        for name, size in self.out_sizes.items():
            shape = self.shapes[name]
            chunk = flat[:, start:start + size].reshape(shape[3], shape[0], shape[1], shape[2], shape[4])
            out[name] = getattr(self, f"base_{name}") + chunk.permute(1, 2, 3, 0, 4)
            start += size
        return out


def expected_shapes(backbone: Backbone, spec: PrefixSpec) -> dict[str, torch.Size]:
    P = spec.num_virtual_tokens
    if spec.method == "prompt":
        return {"prompt": torch.Size((P, backbone.hidden_size))}
    return {stack: torch.Size(g.shape(P)) for stack, g in backbone.stacks.items()}


def check_shapes(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> None:
    if set(tensors) != set(shapes):
        raise WorkerError(f"prefix tensors {sorted(tensors)} do not match the expected {sorted(shapes)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise WorkerError(f"prefix tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")


@torch.no_grad()
def served_form(backbone: Backbone, tensors: PrefixTensors) -> PrefixTensors:
    """What serving keeps of a prefix: on a decoder-only backbone a soft prompt becomes the
    keys/values the model computes for it, once, instead of at every prefill; the model reads the
    same P earlier positions either way. Deep prefixes, and a soft prompt that goes into an
    encoder, stay as they are."""
    if "prompt" not in tensors or backbone.family.encoder_decoder:
        return tensors
    return {"decoder": prompt_activations(backbone.model, tensors["prompt"].to(backbone.device, backbone.model.dtype))}


def stack_rows(per_user: Sequence[PrefixTensors], row_users: Sequence[int]) -> PrefixTensors:
    """Gather a batch: row r reads the prefix of user `row_users[r]` (leading batch dimension)."""
    index = torch.as_tensor(row_users)
    return {name: torch.stack([t[name] for t in per_user])[index] for name in per_user[0]}
