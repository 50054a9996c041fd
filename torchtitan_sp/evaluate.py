"""Validation on the training mesh: held-out loss, loss by position within documents, passkey probe.

Forward only, under no_grad, on the trainer's parallelized model: FSDP2 gathers weights as in
training, TP and CP split each sequence exactly like a training micro-batch (tokens, labels,
positions and document ids sharded together, so every label keeps its position in its document).
The loss is token-weighted over dp x cp like the training loss. Nothing of training is touched:
the validation data is a stream of its own, restarted at every evaluation; no RNG is drawn;
the model's unsharded weights are freed again at the end (FSDP2 keeps the root's after a forward).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate

from torchtitan_sp.attention.sharding import IGNORE_INDEX
from torchtitan_sp.config import Config, ConfigError
from torchtitan_sp.data.packing import empty_batch
from torchtitan_sp.data.synthetic import SyntheticTokens
from torchtitan_sp.data.text import (
    Corpus,
    Cursor,
    Document,
    TextDataset,
    load_tokenizer,
    parse_text,
    records,
    text_corpus,
)
from torchtitan_sp.data.tokenizer import Tokenizer
from torchtitan_sp.loss import loss_chunk_tokens
from torchtitan_sp.models.shape import model_args
from torchtitan_sp.parallel_dims import ParallelDims
from torchtitan_sp.passkey import PasskeyProbe, parse_depths, parse_lengths, trial_overhead

if TYPE_CHECKING:
    from torchtitan_sp.train import Trainer

logger = logging.getLogger("torchtitan_sp")

BUCKET_BASE = 128  # the first position bucket; later ones double: 0, 128, 256, 512, ...
SYNTHETIC_SEED_OFFSET = 1_000_003  # the synthetic validation stream is not the training stream


def position_buckets(seq_len: int) -> list[int]:
    """Bucket starts 0, 128, 256, 512, ... below seq_len."""
    starts, b = [0], BUCKET_BASE
    while b < seq_len:
        starts.append(b)
        b *= 2
    return starts


def val_seq_len(cfg: Config) -> int:
    return cfg.validation.seq_len or cfg.training.seq_len


def _keyed(e: ValueError) -> ConfigError:
    """The data modules name training's keys; validation reads the same formats under its own."""
    return ConfigError(str(e).replace("training.dataset", "validation.dataset", 1))


def validation_inputs(cfg: Config) -> tuple[Tokenizer, list[Path]]:
    """The tokenizer and the held-out files, checked (errors name validation's keys)."""
    v = cfg.validation
    tokenizer = load_tokenizer(cfg)
    try:  # the training corpus' own file resolution and checks
        corpus = text_corpus(cfg, None if v.dataset == "stdlib" else v.dataset_path, 0, 1, cfg.debug.seed)
    except ValueError as e:
        raise _keyed(e) from None
    return tokenizer, corpus.files


class OneEpoch(Corpus):
    """The documents of this corpus rank, once, in epoch 0's order: a finite set."""

    def documents(self, start: Cursor) -> Iterator[tuple[Cursor, Document]]:
        doc = 0
        for f, path in enumerate(self.order(0)):
            for item, (where, read) in enumerate(records(path, 0, self.columns)):
                if doc % self.dp_size == self.dp_rank and (document := self.document(path, where, read)) is not None:
                    yield Cursor(0, f, item, doc), document
                doc += 1


def validation_corpus(cfg: Config, files: list[Path]) -> OneEpoch:
    """The whole held-out set as one rank's corpus (its samples are dealt to the dp ranks later)."""
    return OneEpoch(files, cfg.debug.seed, 0, 1, "validation.dataset_path",
                    parse_text(model_args(cfg.model).vocab_size))


def validation_samples(cfg: Config, vocab_size: int, dp_rank: int, dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """This dp rank's validation samples from the start of the set, laid out like training's."""
    v, seq_len = cfg.validation, val_seq_len(cfg)
    if v.dataset == "synthetic":
        return iter(SyntheticTokens(vocab_size, seq_len, cfg.debug.seed + SYNTHETIC_SEED_OFFSET, dp_rank, dp_size))
    # One packing of the whole set, its samples dealt to the dp ranks in turn: the same windows
    # whatever the dp degree (each rank tokenizes the whole set; a held-out set is small).
    tokenizer, files = validation_inputs(cfg)
    corpus = validation_corpus(cfg, files)
    return islice(iter(TextDataset(corpus, tokenizer, seq_len, cfg.training.packing)), dp_rank, None, dp_size)


def batches(samples: Iterator[dict[str, torch.Tensor]], batch_size: int,
            limit: int) -> Iterator[dict[str, torch.Tensor]]:
    """Stacked batches of up to batch_size samples; at most `limit` (-1: until the samples end)."""
    n = 0
    while limit < 0 or n < limit:
        group = list(islice(samples, batch_size))
        if not group:
            return
        yield {k: torch.stack([s[k] for s in group]) for k in group[0]}
        n += 1


def validation_texts(cfg: Config) -> Iterator[str] | None:
    """The validation corpus' documents in order (the passkey's haystack text); None for synthetic data."""
    if cfg.validation.dataset == "synthetic":
        return None
    _, files = validation_inputs(cfg)
    corpus = validation_corpus(cfg, files)
    return (doc for _, doc in corpus.documents(None) if isinstance(doc, str))  # pre-tokenized: no text


def check_evaluation(cfg: Config, dims: ParallelDims) -> None:
    """validate()'s rules for [validation] and [passkey]; one-line ConfigError."""
    v, pk = cfg.validation, cfg.passkey
    for key, val, ok, rule in (("validation.freq", v.freq, v.freq >= 1, ">= 1"),
                               ("validation.steps", v.steps, v.steps == -1 or v.steps >= 1, "-1 or >= 1"),
                               ("validation.seq_len", v.seq_len, v.seq_len >= 0, ">= 0 (0 = training.seq_len)"),
                               ("validation.local_batch_size", v.local_batch_size, v.local_batch_size >= 1, ">= 1"),
                               ("passkey.trials", pk.trials, pk.trials >= 1, ">= 1"),
                               ("passkey.digits", pk.digits, 1 <= pk.digits <= 30, "in 1..30")):
        if not ok:
            raise ConfigError(f"{key}: must be {rule}, got {val}")
    if not v.enable:  # keys set without it are meaningful.RULES' errors
        return
    if v.dataset == "synthetic" and v.steps == -1:
        raise ConfigError("validation.steps: -1 (the whole set) needs a finite dataset; the synthetic stream "
                          "has no end: give a number of batches")
    if v.dataset == "files" and not v.dataset_path:
        raise ConfigError("validation.dataset_path: required when validation.dataset = 'files' "
                          "(a file, folder or glob of held-out documents)")
    headtail = dims.cp > 1 and cfg.parallelism.load_balance
    multiple = (2 * dims.cp if headtail else dims.cp) * dims.tp
    need = f"{'2 x ' if headtail else ''}cp x tp = {multiple}"
    if val_seq_len(cfg) % multiple:
        raise ConfigError(f"validation.seq_len {val_seq_len(cfg)} is not divisible by {need} (the mesh splits "
                          "each sequence)")
    tokenizer, _ = validation_inputs(cfg) if v.dataset != "synthetic" else (None, None)
    if pk.lengths:
        lengths = parse_lengths(pk.lengths)
        parse_depths(pk.depths)
        tokenizer = tokenizer or load_tokenizer(cfg)
        least = trial_overhead(tokenizer, pk.digits) + 1
        for n in lengths:
            if n % multiple:
                raise ConfigError(f"passkey.lengths: {n} is not divisible by {need} (the mesh splits each haystack)")
            if n < least:
                raise ConfigError(f"passkey.lengths: {n} tokens cannot hold the key, its statement and the question "
                                  f"({least} tokens at least with passkey.digits {pk.digits})")


def describe_evaluation(cfg: Config) -> str:
    """What validation and the passkey probe will do, in one line ("" when validation is off)."""
    v, pk = cfg.validation, cfg.passkey
    if not v.enable:
        return ""
    when = "once, on the starting weights (eval_only)" if v.eval_only else f"every {v.freq} steps and after the last"
    line = (f"validation: {v.dataset} {v.dataset_path}".rstrip() + f", seq_len {val_seq_len(cfg)}, "
            f"{'the whole set' if v.steps == -1 else f'{v.steps} batches'} of {v.local_batch_size} per dp rank, "
            + when)
    if pk.lengths:
        line += (f"; passkey lengths {pk.lengths} x depths {pk.depths}, {pk.trials} trials per cell, "
                 f"{pk.digits}-digit keys")
    return line


class Evaluator:
    """Runs validation (and the passkey probe) on the trainer's model and logs the metrics."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.cfg = trainer, trainer.cfg
        t = dataclasses.replace(self.cfg.training, dataset=self.cfg.validation.dataset)
        self.document_masks = t.document_masks  # packed real text: document-causal attention
        self.seq_len = val_seq_len(self.cfg)
        self.buckets = position_buckets(self.seq_len)
        self.dp_rank = trainer.meshes["dp"].get_local_rank()
        self.passkey = None
        if self.cfg.passkey.lengths:
            self.passkey = PasskeyProbe(self, validation_texts(self.cfg))
        logger.info(describe_evaluation(self.cfg))

    def due(self, step: int) -> bool:
        return step % self.cfg.validation.freq == 0 or step == self.cfg.training.steps

    def run_eval_only(self) -> None:
        """validation.eval_only: evaluate the starting weights under the step they were saved at."""
        tr, ck = self.trainer, self.cfg.checkpoint
        if tr.step == 0 and not ck.initial_load_path:
            logger.info("validation.eval_only: nothing to load (no checkpoint to resume, no "
                        "checkpoint.initial_load_path): evaluating the initial weights (seed "
                        f"{self.cfg.debug.seed})")
        self.run(tr.step)

    def run(self, step: int) -> float:
        """Evaluate, log under `step`; returns the seconds it took (not training time)."""
        start = time.perf_counter()
        record = self.validate()
        if not record["val_tokens"]:
            logger.warning(f"validation step {step}: the held-out set gave no label (a packed set needs more than "
                           f"validation.seq_len {self.seq_len} tokens); nothing logged")
            self._free_unsharded_weights()
            return time.perf_counter() - start
        scalars = {"val/loss": record["val_loss"], "val/ppl": record["val_ppl"],
                   **{f"val/loss_by_position/{int(b):07d}": x for b, x in record["val_loss_by_position"].items()}}
        by_pos = " ".join(f"{b}:{x:.3f}" for b, x in record["val_loss_by_position"].items())
        line = (f"validation step {step}: loss {record['val_loss']:.4f} ppl {record['val_ppl']:.2f} "
                f"({record['val_tokens']:,} tokens); loss by position {by_pos}")
        images = {}
        if self.passkey is not None:
            acc, png = self.passkey.run(step)
            record["passkey_accuracy"] = acc
            cells = [x for row in acc.values() for x in row.values()]
            scalars["val/passkey_accuracy"] = sum(cells) / len(cells)
            images["val/passkey"] = png
            line += "; passkey accuracy " + " ".join(
                f"{n}:[{' '.join(f'{x:.2f}' for x in row.values())}]" for n, row in acc.items())
        self._free_unsharded_weights()
        elapsed = time.perf_counter() - start
        self.trainer.metrics.log_record(step, record, scalars, f"{line} in {elapsed:.1f}s", images)
        return elapsed

    def _free_unsharded_weights(self) -> None:
        """FSDP2 keeps the root's gathered weights after a forward (for the backward that training
        runs); after a forward-only pass nothing would free them."""
        for m in self.trainer.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @torch.no_grad()
    def validate(self) -> dict:
        tr, v = self.trainer, self.cfg.validation
        nb = len(self.buckets)
        bounds = torch.tensor(self.buckets[1:], device=tr.device)
        # loss sum, valid labels, per-bucket loss sums, per-bucket counts (float64: exact counts)
        sums = torch.zeros(2 + 2 * nb, dtype=torch.float64, device=tr.device)
        samples = validation_samples(self.cfg, tr.model_args.vocab_size, self.dp_rank, tr.dims.dp)
        it = batches(samples, v.local_batch_size, v.steps)
        while True:
            batch = next(it, None)
            more = torch.tensor([float(batch is not None)], device=tr.device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)  # dp ranks' shares of a finite set differ
            if not more.item():
                break
            b = tr._shard(batch if batch is not None else empty_batch(self.seq_len))
            loss = self.token_losses(b).double()
            valid = b["labels"] != IGNORE_INDEX
            bucket = torch.bucketize(b["positions"][valid], bounds, right=True)
            sums[0] += loss.sum()
            sums[1] += valid.sum()
            sums[2:2 + nb].index_add_(0, bucket, loss[valid])
            sums[2 + nb:] += torch.bincount(bucket, minlength=nb).double()
        dist.all_reduce(sums, group=tr.meshes["dp_cp"].get_group())
        total, count = sums[:2].tolist()
        mean = total / max(count, 1.0)
        by_pos = {str(b): s / c for b, s, c in zip(self.buckets, sums[2:2 + nb].tolist(), sums[2 + nb:].tolist())
                  if c > 0}
        return {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0)), "val_loss_by_position": by_pos,
                "val_tokens": int(count)}

    def hidden_states(self, b: dict[str, torch.Tensor], document_masks: bool) -> torch.Tensor:
        """Final hidden states (B, S_local, dim) of a sharded batch, replicated over tp when TP shards them."""
        docs = b["document_ids"] if document_masks else None
        with self.trainer._step_context():
            h = self.trainer.model.hidden_states(b["tokens"], b["positions"], docs)
        if isinstance(h, DTensor):  # TP-SP: Shard(1) over the sequence
            h = h.redistribute(placements=[Replicate()] * h.device_mesh.ndim)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of rows h (N, dim) (a replicated DTensor under TP), a plain tensor."""
        with self.trainer._step_context():
            out = self.trainer.model.output(h)
        return out.full_tensor() if isinstance(out, DTensor) else out

    def token_losses(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-label fp32 cross-entropy (B, S_local), 0 at ignored labels; in chunks of tokens."""
        h = self.hidden_states(b, self.document_masks).flatten(0, 1)
        labels = b["labels"].flatten()
        chunk = loss_chunk_tokens(self.trainer.model_args.vocab_size)
        parts = [F.cross_entropy(self.logits(h_c).float(), y_c, ignore_index=IGNORE_INDEX, reduction="none")
                 for h_c, y_c in zip(h.split(chunk), labels.split(chunk))]
        return torch.cat(parts).view_as(b["labels"])
