"""What a real-data run reads: one corpus or a weighted mixture of several, and the checks of the
data keys before launch.

`training.dataset_path` is one source (a file, folder or glob), or a mixture
"a/*.jsonl:0.6,b/*.parquet:0.4": sources with positive weights (normalised to sum 1). Each source
is an independent stream (its own file order, epochs, packing and resume state, seeded with
debug.seed + its index); each sample (a packed window) comes from one source, picked by a seeded
deficit sampler: at draw n a source i is eligible while it has had fewer than w_i (n + 1)
samples, and one eligible source is drawn at random in proportion to its shortfall. So every
source's count stays within one sample of w_i n (proportions hold on short runs too) while the
order is random. The state (draws, per-source counts and token counts, and every source's own
state) travels in the StatefulDataLoader state, so a resume continues the same sequence; on
another dp degree each source continues after the furthest document an old rank used of it.
"""

from __future__ import annotations

import math
import random
from functools import partial
from typing import Any, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset

from torchtitan_sp.attention.sharding import IGNORE_INDEX
from torchtitan_sp.config import Config, ConfigError, Training, resolve_repo_path
from torchtitan_sp.data.chat import CHAT_COLUMNS, CHAT_NEEDS, ChatDataset, parse_chat
from torchtitan_sp.data.text import (
    Corpus,
    TextDataset,
    check_file,
    check_ranks_have_documents,
    load_tokenizer,
    resolve_files,
    resume_after,
    text_corpus,
)
from torchtitan_sp.data.tokenizer import Tokenizer
from torchtitan_sp.models.shape import model_args

SCAN_BYTES = 64 * 2**20  # corpora up to this size have every record parsed before launch
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")


class Source(NamedTuple):
    pattern: str
    weight: float  # normalised: the weights of a run sum to 1


def parse_sources(value: str) -> list[Source]:
    """training.dataset_path -> its sources: one path (weight 1), or "PATH:WEIGHT,PATH:WEIGHT,..."."""
    key = "training.dataset_path"
    if "," not in value and (":" not in value or resolve_repo_path(value).exists()):
        return [Source(value, 1.0)]
    sources = []
    for part in value.split(","):
        pattern, colon, weight = part.strip().rpartition(":")
        if not colon or not pattern:
            raise ConfigError(f"{key}: {part.strip()!r} is not PATH:WEIGHT; a mixture is \"a/*.jsonl:0.6,"
                              "b/*.parquet:0.4\" (every source with a weight)")
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"{key}: the weight {weight!r} of {pattern} is not a number") from None
        if not (w > 0 and math.isfinite(w)):
            raise ConfigError(f"{key}: the weight of {pattern} must be a positive number, got {weight}")
        sources.append(Source(pattern, w))
    total = sum(s.weight for s in sources)
    return [s._replace(weight=s.weight / total) for s in sources]


def check_data_keys(cfg: Config) -> None:
    """A data key the chosen dataset would ignore is an error, not silence."""
    t, default = cfg.training, Training()
    reads = {"synthetic": "generates its tokens", "stdlib": "reads this interpreter's standard library"}
    if t.dataset in reads and t.dataset_path:
        raise ConfigError(f"training.dataset_path: set ({t.dataset_path}), but training.dataset = {t.dataset!r} "
                          f"{reads[t.dataset]}; set training.dataset = 'files' (or 'chat') to read the path")
    if t.dataset == "synthetic" and t.packing != default.packing:
        raise ConfigError("training.packing: synthetic samples are one document each; packing applies to "
                          "training.dataset stdlib, files or chat")
    for name in ("train_on_prompt", "truncation"):
        if t.dataset != "chat" and getattr(t, name) != getattr(default, name):
            raise ConfigError(f"training.{name}: applies to training.dataset = 'chat' only "
                              f"(training.dataset is {t.dataset!r})")


def chat_corpus(cfg: Config, pattern: str, dp_rank: int, dp_size: int, seed: int) -> Corpus:
    parse = partial(parse_chat, model_args(cfg.model).vocab_size)
    files = resolve_files(pattern, supported=CHAT_SUFFIXES)
    for f in files:
        check_file(f, CHAT_COLUMNS, CHAT_NEEDS, parse)
    return Corpus(files, seed, dp_rank, dp_size, "training.dataset_path", parse, CHAT_COLUMNS)


def source_corpora(cfg: Config, dp_rank: int, dp_size: int) -> tuple[list[Source], list[Corpus]]:
    t = cfg.training
    sources = [Source("stdlib", 1.0)] if t.dataset == "stdlib" else parse_sources(t.dataset_path)
    corpus = chat_corpus if t.dataset == "chat" else text_corpus
    return sources, [corpus(cfg, None if t.dataset == "stdlib" else s.pattern, dp_rank, dp_size, cfg.debug.seed + i)
                     for i, s in enumerate(sources)]


def check_data_config(cfg: Config, dp_size: int = 1) -> None:
    """Everything build_dataset checks, before any process starts (validate.py): the data keys, the
    tokenizer, each source's files and first records, that every dp rank gets a document; and for
    a corpus of files up to SCAN_BYTES every record (a bad one is one line here instead of a
    failure mid-run, from the data loader)."""
    check_data_keys(cfg)
    if cfg.training.dataset == "synthetic":
        return
    load_tokenizer(cfg)
    for corpus in source_corpora(cfg, 0, 1)[1]:
        scan_all = cfg.training.dataset != "stdlib" and sum(f.stat().st_size for f in corpus.files) <= SCAN_BYTES
        check_ranks_have_documents(corpus, dp_size, scan_all)


def build_dataset(cfg: Config, dp_rank: int, dp_size: int) -> IterableDataset:
    """The stdlib, files or chat dataset of this dp rank: one source's stream, or a mixture."""
    tokenizer = load_tokenizer(cfg)
    sources, corpora = source_corpora(cfg, dp_rank, dp_size)
    streams = [_stream(cfg, c, tokenizer) for c in corpora]
    if len(streams) == 1:
        return streams[0]
    return MixtureDataset(sources, streams, cfg.debug.seed, dp_rank)


def _stream(cfg: Config, corpus: Corpus, tokenizer: Tokenizer) -> IterableDataset:
    t = cfg.training
    if t.dataset == "chat":
        return ChatDataset(corpus, tokenizer, t.seq_len, t.packing, t.train_on_prompt, t.truncation)
    return TextDataset(corpus, tokenizer, t.seq_len, t.packing)


class MixtureDataset(IterableDataset):
    """Samples drawn from several source streams in set proportions (see the module docstring)."""

    def __init__(self, sources: list[Source], streams: list[IterableDataset], seed: int, dp_rank: int):
        self.sources, self.streams, self.seed, self.dp_rank = sources, streams, seed, dp_rank
        self.draws = 0
        self.counts = [0] * len(sources)  # samples drawn per source (this rank)
        self.tokens = [0] * len(sources)  # their labelled tokens

    def pick(self) -> int:
        """The source of draw number self.draws: random among those behind their share."""
        behind = [(i, s.weight * (self.draws + 1) - c) for i, (s, c) in enumerate(zip(self.sources, self.counts))]
        behind = [(i, d) for i, d in behind if d > 0]
        rng = random.Random(f"{self.seed}/{self.dp_rank}/{self.draws}")
        return rng.choices([i for i, _ in behind], weights=[d for _, d in behind])[0]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        iterators = [iter(s) for s in self.streams]
        while True:
            i = self.pick()
            sample = next(iterators[i])
            self.draws += 1
            self.counts[i] += 1
            self.tokens[i] += int((sample["labels"] != IGNORE_INDEX).sum())
            yield sample

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "counts": list(self.counts), "tokens": list(self.tokens),
                "sources": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.streams):
            raise ValueError(f"training.dataset_path: the checkpoint's data state has {len(state['sources'])} "
                             f"sources, this run's mixture {len(self.streams)}; resume with the same sources")
        self.draws, self.counts, self.tokens = state["draws"], list(state["counts"]), list(state["tokens"])
        for stream, st in zip(self.streams, state["sources"]):
            stream.load_state_dict(st)


MIXTURE_STATE = {"draws", "counts", "tokens", "sources"}


def mixture_resume_after(states: list[dict[str, Any]], dp_rank: int) -> dict[str, Any]:
    """A mixture's state on another dp degree, from every old dp rank's: each source continues
    after the furthest document any old rank used of it (text.resume_after), the sampler starts
    afresh (its shares hold from any start), and new dp rank 0 carries the token counts so far."""
    n = len(states[0]["sources"])
    return {"draws": 0, "counts": [0] * n,
            "tokens": [sum(st["tokens"][i] for st in states) if dp_rank == 0 else 0 for i in range(n)],
            "sources": [resume_after([st["sources"][i] for st in states]) for i in range(n)]}


def data_metrics(dataset: IterableDataset, group: dist.ProcessGroup, device: torch.device) -> dict[str, int]:
    """Per-source labelled tokens so far, summed over the data-parallel ranks (a mixture's only;
    every rank calls it: a collective)."""
    if not isinstance(dataset, MixtureDataset):
        return {}
    tokens = torch.tensor(dataset.tokens, dtype=torch.int64, device=device)
    dist.all_reduce(tokens, group=group)
    return {f"tokens_source{i}": int(n) for i, n in enumerate(tokens.tolist())}



