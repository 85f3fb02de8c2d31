"""A small backbone that can write, made here from nothing: a byte-level BPE tokenizer learnt from a
corpus, then a GPT-2 pretrained on one pass over it, saved in save_pretrained layout.

Loaded like any model (`from_pretrained`, then frozen), it writes fluent text of the corpus's kind,
so what a prefix adds to it can be read in its generations, not only in its losses.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from prefixfleet.workers.data import IGNORE
from prefixfleet.workers.tiny import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

RECORD_FILE = "pretraining.json"


@dataclass(frozen=True)
class Pretraining:
    """How the backbone is made; with the same corpus these give the same weights on one machine."""

    hidden: int = 128
    layers: int = 3
    heads: int = 4
    context: int = 512
    vocab_size: int = 1024
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    dropout: float = 0.0  # one pass sees each record once: nothing to regularize, and it learns faster
    seed: int = 0


def bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE learnt from `texts`: frequent words become single tokens, and all 256 bytes stay
    in the alphabet, so any text still round-trips."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def _corpus_digest(records: Sequence[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for prompt, completion in records:
        digest.update(json.dumps([prompt, completion]).encode())
    return digest.hexdigest()


def _record(records: Sequence[tuple[str, str]], settings: Pretraining) -> dict:
    return {"settings": asdict(settings), "records": len(records), "corpus_sha256": _corpus_digest(records)}


def is_pretrained(out_dir: str | Path, records: Sequence[tuple[str, str]], settings: Pretraining) -> bool:
    """Whether `out_dir` already holds the backbone these records and settings make."""
    path = Path(out_dir) / RECORD_FILE
    if not path.exists():
        return False
    made = json.loads(path.read_text())
    return {k: made.get(k) for k in ("settings", "records", "corpus_sha256")} == _record(records, settings)


def _batches(rows: list[list[int]], batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(rows), generator=generator).tolist()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        batch = [rows[i] for i in order[start:start + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in batch])
        labels = torch.tensor([r + [IGNORE] * (width - len(r)) for r in batch])
        yield ids, labels


def pretrain_backbone(out_dir: str | Path, records: Sequence[tuple[str, str]],
                      settings: Pretraining | None = None) -> float:
    """Learn a tokenizer and a GPT-2 from (prompt, completion) records, tokenized as training
    tokenizes them (prompt, completion, end of sequence); write both to `out_dir` at once (a half-made
    backbone is never left there). Returns the mean loss of the last tenth of the pass."""
    settings = settings or Pretraining()
    steps = len(records) // settings.batch_size
    if steps < 1:
        raise ValueError(f"{len(records)} records make no batch of {settings.batch_size}")
    tokenizer = bpe_tokenizer((prompt + completion for prompt, completion in records), settings.vocab_size)
    rows = [tokenizer(prompt, add_special_tokens=False).input_ids
            + tokenizer(completion, add_special_tokens=False).input_ids + [EOS_ID] for prompt, completion in records]
    torch.manual_seed(settings.seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_embd=settings.hidden, n_layer=settings.layers, n_head=settings.heads,
        n_positions=settings.context, resid_pdrop=settings.dropout, embd_pdrop=settings.dropout,
        attn_pdrop=settings.dropout, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / settings.warmup_steps) * max(0.05, 1 - step / steps))
    model.train()
    tail = []
    for step, (ids, labels) in enumerate(_batches(rows, settings.batch_size, torch.Generator().manual_seed(settings.seed))):
        logits = model(input_ids=ids, attention_mask=(labels != IGNORE).long()).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    final = sum(tail) / len(tail)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / RECORD_FILE).write_text(json.dumps(_record(records, settings) | {"final_loss": final}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return final
