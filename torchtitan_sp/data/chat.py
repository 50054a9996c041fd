"""Chat / instruction data (`training.dataset = "chat"`): conversations rendered in Llama 3's chat
format, with only the assistant's replies as labels.

Records (.jsonl lines, .json array elements, .parquet rows): {"messages": [{"role": "system" |
"user" | "assistant" | "tool", "content": str}, ...]} (the Hugging Face / OpenAI format), or
{"prompt": str, "completion": str} (= one user and one assistant message), or a conversation
rendered and tokenized before: {"input_ids": [...], "labels": [...]} (-100 = not a label).

Rendering is Llama 3.1's chat template (transformers' apply_chat_template with the template of
Meta's Llama-3.1-Instruct tokenizer gives the same ids; tests/test_chat.py checks): BOS, a system
block that always opens with the template's "Cutting Knowledge Date: December 2023 / Today Date:
26 Jul 2024" lines followed by the system message (if any), then each message as
<|start_header_id|>role<|end_header_id|>\n\n content (stripped) <|eot_id|>; a tool message is the
template's "ipython" role with its content as a JSON string. Special-token strings inside content
stay ordinary text (apply_chat_template would turn them into control tokens).

Labels: the assistant content tokens and their <|eot_id|>; BOS, headers, system, user and tool
turns are IGNORE_INDEX unless training.train_on_prompt. Conversations longer than seq_len are
dropped or cut to their first seq_len tokens (training.truncation), and counted in the log.
Packing puts whole conversations into a window while they fit (each with its own positions and
document id), pads the rest; a conversation is never split over two windows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset

from torchtitan_sp.attention.sharding import IGNORE_INDEX
from torchtitan_sp.data.packing import window_sample
from torchtitan_sp.data.text import Corpus, Cursor, DataError, Document, TokenDoc, token_document
from torchtitan_sp.data.tokenizer import Tokenizer

logger = logging.getLogger("torchtitan_sp")

ROLES = ("system", "user", "assistant", "tool")
CHAT_COLUMNS = ("messages", "prompt", "completion", "input_ids", "labels")  # the parquet columns a chat corpus reads
CHAT_NEEDS = '"messages" (or "prompt" and "completion")'
SYSTEM_PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"  # Llama 3.1's default
# Which role may follow which (None: the start, after an optional system message).
_FOLLOWS = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}

Conversation = list[tuple[str, str]]


def parse_chat(vocab_size: int, path: Path, where: str, record: Any) -> Conversation | TokenDoc:
    """A record -> [(role, content), ...] (or a pre-tokenized record's TokenDoc), or a one-line
    DataError naming the file and record."""
    at = f"training.dataset_path: {path} {where}"
    if isinstance(record, dict) and "messages" not in record and "input_ids" in record:
        return token_document(path, where, record, vocab_size)
    if isinstance(record, dict) and "messages" not in record and {"prompt", "completion"} <= set(record):
        record = {"messages": [{"role": "user", "content": record["prompt"]},
                               {"role": "assistant", "content": record["completion"]}]}
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise DataError(f"{at}: no messages (a chat record is {{\"messages\": [{{\"role\": ..., \"content\": ...}}, "
                        "...]} or {\"prompt\": ..., \"completion\": ...})")
    conversation, previous = [], None
    for i, m in enumerate(record["messages"]):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise DataError(f"{at}: message {i} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{at}: message {i} ({role}) has no \"content\" string")
        if role == "system" and i == 0:
            conversation.append((role, m["content"]))
            continue
        if role not in _FOLLOWS[previous]:
            after = f"after a {previous} message" if previous else "first (after an optional system message)"
            allowed = " or ".join(_FOLLOWS[previous])
            raise DataError(f"{at}: message {i} is {role} {after}; only {allowed} can come there")
        conversation.append((role, m["content"]))
        previous = role
    if "assistant" not in (r for r, _ in conversation):
        raise DataError(f"{at}: no assistant message (nothing to train on)")
    return conversation


def render(tok: Tokenizer, conversation: Conversation, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids of the conversation in Llama 3.1's chat format, and their targets: the id where it
    is a label (assistant content and its <|eot_id|>; every token with train_on_prompt), else
    IGNORE_INDEX."""
    special = tok.special_tokens
    ids, targets = [tok.bos_id], [tok.bos_id if train_on_prompt else IGNORE_INDEX]

    def add(piece: list[int], label: bool) -> None:
        ids.extend(piece)
        targets.extend(piece if label or train_on_prompt else [IGNORE_INDEX] * len(piece))

    def turn(role: str, body: str, label: bool) -> None:
        add([special["<|start_header_id|>"], *tok.encode(role, False, False), special["<|end_header_id|>"]], False)
        # "\n\n" and the content are encoded apart: the split pattern cuts there anyway (the content
        # starts with a non-space after strip), and only the content is a label.
        add(tok.encode("\n\n", False, False), False)
        add([*tok.encode(body, False, False), special["<|eot_id|>"]], label)

    system = conversation[0][1].strip() if conversation[0][0] == "system" else ""
    turn("system", SYSTEM_PREAMBLE + system, False)
    for role, content in conversation[1 if conversation[0][0] == "system" else 0:]:
        if role == "tool":  # the template's ipython turn; a string content is JSON-encoded (tojson)
            turn("ipython", json.dumps(content, ensure_ascii=False), False)
        else:
            turn(role, content.strip(), role == "assistant")
    return ids, targets


class ChatDataset(IterableDataset):
    """An infinite, resumable stream of one dp rank's chat samples: whole conversations packed
    into windows (or one per sample without packing), labels only where render() puts them."""

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, seq_len: int, packing: bool, train_on_prompt: bool,
                 truncation: str):
        self.corpus, self.tokenizer, self.seq_len, self.packing = corpus, tokenizer, seq_len, packing
        self.train_on_prompt, self.truncation = train_on_prompt, truncation
        self.cursor = Cursor(0, 0, 0, 0)  # the first conversation of the next sample
        self.seen = self.cut = 0  # conversations read, and dropped or truncated (this rank, this process)

    def _conversations(self) -> Iterator[tuple[Cursor, list[int], list[int]]]:
        conv: Document
        last_kept = self.cursor.epoch - 1  # the epoch of the last conversation kept
        for cursor, conv in self.corpus.documents(self.cursor):
            if cursor.epoch - last_kept >= 3:  # a whole epoch kept nothing: the stream would spin forever
                raise DataError(f"training.truncation = drop: every conversation of data-parallel rank "
                                f"{self.corpus.dp_rank} is longer than training.seq_len {self.seq_len}; set "
                                "training.truncation = right or a longer training.seq_len")
            if isinstance(conv, TokenDoc):  # rendered and tokenized before: as stored
                ids, targets = conv.ids, conv.targets or conv.ids
            else:
                ids, targets = render(self.tokenizer, conv, self.train_on_prompt)
            self.seen += 1
            if len(ids) > self.seq_len:
                self.cut += 1
                self._report(len(ids))
                if self.truncation == "drop":
                    continue
                ids, targets = ids[:self.seq_len], targets[:self.seq_len]
            last_kept = cursor.epoch
            yield cursor, ids, targets

    def _report(self, length: int) -> None:
        """Log at the 1st, 10th, 100th and every 1000th conversation cut: counts, not a line per sample."""
        if self.cut in (1, 10, 100) or self.cut % 1000 == 0:
            what = "dropped" if self.truncation == "drop" else f"truncated to their first {self.seq_len} tokens"
            logger.warning(f"training.truncation = {self.truncation}: {self.cut} of {self.seen} conversations read "
                           f"by this data-parallel rank were longer than seq_len {self.seq_len} and {what} "
                           f"(the last: {length} tokens)")

    def _sample(self, convs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Whole conversations, then padding (ignored labels, a document of its own) to seq_len + 1."""
        window = [t for ids, _ in convs for t in ids]
        targets = [t for _, tg in convs for t in tg]
        pad = self.seq_len + 1 - len(window)
        runs = [len(ids) for ids, _ in convs] + [pad]
        return window_sample(window + [self.tokenizer.pad_id] * pad, runs, targets + [IGNORE_INDEX] * pad)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[tuple[list[int], list[int]]] = []
        used = 0
        for cursor, ids, targets in self._conversations():
            if pending and (not self.packing or used + len(ids) > self.seq_len):
                sample = self._sample(pending)
                self.cursor = cursor  # set before yielding: the state a loader saves
                yield sample
                pending, used = [], 0
            pending.append((ids, targets))
            used += len(ids)

    def state_dict(self) -> dict[str, int]:
        return {**self.cursor._asdict(), "offset": 0}  # the text datasets' layout: resume_after applies

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = Cursor(*(int(state[k]) for k in Cursor._fields))
