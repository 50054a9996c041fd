"""The start-up lines that name a run's data: sources, files, documents, tokenizer, layout, and how
many times the run will read each source (a warning when it wraps around a small corpus)."""

from __future__ import annotations

import logging
from itertools import islice

from torch.utils.data import IterableDataset

from torchtitan_sp.config import Config
from torchtitan_sp.data.chat import ChatDataset, render
from torchtitan_sp.data.sources import SCAN_BYTES, MixtureDataset, Source
from torchtitan_sp.data.text import Cursor, TextDataset, TokenDoc, records

SAMPLE_DOCS, SAMPLE_TOKENS = 64, 50_000  # tokenized to estimate a source's tokens per document


def _tokens(stream: TextDataset | ChatDataset, doc: object) -> int:
    if isinstance(doc, TokenDoc):
        return len(doc.ids)
    if isinstance(stream, ChatDataset):
        return len(render(stream.tokenizer, doc, stream.train_on_prompt)[0])
    return len(stream.tokenizer.encode(doc, bos=True, eos=True))


def _source_line(i: int, source: Source, stream: TextDataset | ChatDataset, run_tokens: int) -> tuple[int, str]:
    """Files, size, records (a .txt file is one; .jsonl lines are counted, not parsed), tokens
    estimated from the first documents, and the epochs this run's share of tokens amounts to."""
    corpus = stream.corpus
    size = sum(f.stat().st_size for f in corpus.files)
    name = "stdlib" if corpus.key == "training.dataset" else source.pattern
    line = f"data source {i}: {name} (weight {source.weight:.2f}): {len(corpus.files)} files, {size / 2**20:.1f} MiB"
    if size > SCAN_BYTES:
        return logging.INFO, line + "; documents not counted (more than a start-up scan should read)"
    docs = sum(1 for path in corpus.files for _ in records(path, 0, corpus.columns))
    whole = type(corpus)(corpus.files, corpus.seed, 0, 1, corpus.key, corpus.parse, corpus.columns)
    sample: list[int] = []
    for _, doc in islice(whole.documents(Cursor(0, 0, 0, 0)), min(docs, SAMPLE_DOCS)):
        sample.append(_tokens(stream, doc))
        if sum(sample) > SAMPLE_TOKENS:
            break
    tokens = docs * sum(sample) / max(len(sample), 1)
    epochs = run_tokens * source.weight / max(tokens, 1)
    line += (f", {docs:,} documents, about {tokens:,.0f} tokens; this run reads about {epochs:.2f} epochs of it "
             f"({run_tokens * source.weight:,.0f} tokens, padding included)")
    if epochs > 1:
        return logging.WARNING, line + ": the run wraps around this small corpus (each epoch reshuffles its files)"
    return logging.INFO, line


def describe_data(cfg: Config, dataset: IterableDataset, run_tokens: int) -> list[tuple[int, str]]:
    """(log level, line) pairs for the start-up summary; `run_tokens` = the run's global tokens."""
    t = cfg.training
    if t.dataset == "synthetic":
        return [(logging.INFO, f"data: synthetic tokens (debug.seed {cfg.debug.seed}), one document per sample")]
    if isinstance(dataset, MixtureDataset):
        sources, streams = dataset.sources, dataset.streams
    else:
        sources, streams = [Source(t.dataset_path, 1.0) if t.dataset_path else Source("stdlib", 1.0)], [dataset]
    tok = streams[0].tokenizer
    layout = ("whole conversations packed per window" if t.dataset == "chat" else "documents packed into windows") \
        if t.packing else "one document per sample, padded"
    lines = [(logging.INFO, f"data: training.dataset {t.dataset}, {len(sources)} source(s); tokenizer {tok.path} "
                            f"({tok.n_words:,} tokens); {layout}"
                            + (" with document masks" if t.document_masks else ""))]
    if t.dataset == "chat":
        lines.append((logging.INFO, f"chat: Llama 3.1 chat format, labels on "
                                    f"{'every token' if t.train_on_prompt else 'assistant replies only'}; "
                                    f"conversations longer than seq_len {t.seq_len}: {t.truncation}"))
    lines += [_source_line(i, s, st, run_tokens) for i, (s, st) in enumerate(zip(sources, streams))]
    return lines

