"""Chat data: Llama 3.1 chat rendering against transformers' apply_chat_template, prompt masks,
packing and truncation, bad records, data keys a dataset would ignore, the prompt-masking learning
check, and packed chat under cp (every strategy) and dp against one process."""

from __future__ import annotations

import json
import logging
import random
import string
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.dist_utils import free_port, run_distributed
from tests.test_train import assert_close, losses
from tests.trainer_utils import resumed_loader_matches, tiny_args, train
from torchtitan_sp.attention.sharding import IGNORE_INDEX
from torchtitan_sp.config import load_config
from torchtitan_sp.data import build_dataloader
from torchtitan_sp.data.chat import render
from torchtitan_sp.data.sources import build_dataset, check_data_config
from torchtitan_sp.data.text import DataError
from torchtitan_sp.data.tokenizer import PAT_STR, SPECIAL_TOKENS, Tokenizer

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "assets" / "tokenizer" / "tokenizer.model"

# The chat_template of Meta's Llama-3.1-8B-Instruct tokenizer_config.json, verbatim.
LLAMA_3_1_TEMPLATE = "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n{#- System message + builtin tools #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if builtin_tools is defined or tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{%- if builtin_tools is defined %}\n    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n            {%- for arg_name, arg_val in tool_call.arguments | items %}\n                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n                    {{- \", \" }}\n                {%- endif %}\n                {%- endfor %}\n            {{- \")\" }}\n        {%- else  %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- \"}\" }}\n        {%- endif %}\n        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n            {{- \"<|eom_id|>\" }}\n        {%- else %}\n            {{- \"<|eot_id|>\" }}\n        {%- endif %}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"  # noqa: E501

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"}],
    [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "2 + 2?\n\n"},
     {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "6, of course.\n"}],
    [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Let me look it up."},
     {"role": "tool", "content": '{"temperature": 21, "unit": "C"}'}, {"role": "tool", "content": "sunny"},
     {"role": "assistant", "content": "21 °C and sunny — enjoy ☀"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "déjà vu\ttabs   and  spaces"},
     {"role": "assistant", "content": "```python\nprint('x')\n```"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' fast tokenizer for the shipped tokenizer.model (its tiktoken converter), with
    Llama 3.1's chat template: nothing downloaded."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    converter = TikTokenConverter(vocab_file=str(TOKENIZER), pattern=PAT_STR, extra_special_tokens=SPECIAL_TOKENS)
    core = converter.converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = LLAMA_3_1_TEMPLATE
    return hf


def hf_ids(hf, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def as_pairs(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_render_matches_apply_chat_template(hf_tokenizer, index: int) -> None:
    """Ids equal apply_chat_template's (Llama 3.1 template, its default system block included);
    the labels are exactly each assistant message's tokens and its <|eot_id|>: the span between the
    conversation up to the previous message with the generation prompt and up to this message."""
    tok, messages = Tokenizer(TOKENIZER), CONVERSATIONS[index]
    ids, targets = render(tok, as_pairs(messages), train_on_prompt=False)
    assert ids == hf_ids(hf_tokenizer, messages)
    expected = [IGNORE_INDEX] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(hf_ids(hf_tokenizer, messages[:k], True)), len(hf_ids(hf_tokenizer, messages[:k + 1]))
            expected[start:end] = ids[start:end]
            assert tok.decode(ids[start:end]) == m["content"].strip() + "<|eot_id|>"
    assert targets == expected
    assert render(tok, as_pairs(messages), train_on_prompt=True) == (ids, ids)


def test_prompt_completion_record_is_a_user_and_an_assistant_message(hf_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "Name a colour.", "completion": "Blue."}) + "\n")
    ds = build_dataset(chat_config(path, "--training.packing", "false"), 0, 1)
    sample = next(iter(ds))
    ids = hf_ids(hf_tokenizer, [{"role": "user", "content": "Name a colour."},
                                {"role": "assistant", "content": "Blue."}])
    assert sample["tokens"][:len(ids)].tolist() == ids
    labelled = sample["labels"][sample["labels"] != IGNORE_INDEX].tolist()
    assert ds.tokenizer.decode(labelled) == "Blue.<|eot_id|>"


def chat_config(path: Path | str, *args: str):
    return load_config(["--config", "", "--training.dataset", "chat", "--training.dataset_path", str(path), *args])


def write_chats(path: Path, conversations: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def qa(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_packing_whole_conversations_and_truncation(tmp_path: Path, caplog) -> None:
    """Conversations fill a window while they fit, each with positions from 0 and its own document
    id; the rest is padding (no labels). Longer than seq_len: dropped or cut to seq_len, counted."""
    convs = [qa(f"q{i}", "a" * (1 + i % 3)) for i in range(6)] + [qa("long " * 200, "x")] + [qa("end", "ok")]
    path = write_chats(tmp_path / "c.jsonl", convs)
    tok = Tokenizer(TOKENIZER)
    rendered = [render(tok, as_pairs(c), False) for c in convs]
    n = [len(ids) for ids, _ in rendered]
    seq = 160
    assert max(n[:6]) * 2 <= seq < n[6]
    for truncation in ("drop", "right"):
        ds = build_dataset(chat_config(path, "--training.seq_len", str(seq), "--training.truncation", truncation), 0, 1)
        it = iter(ds)
        with caplog.at_level(logging.WARNING, logger="torchtitan_sp"):
            samples = [next(it) for _ in range(4)]
        assert ds.cut == 1 and ds.seen >= 7
        what = "dropped" if truncation == "drop" else "truncated to their first 160 tokens"
        assert f"training.truncation = {truncation}: 1 of 7 conversations read by this data-parallel rank were " \
               f"longer than seq_len 160 and {what}" in caplog.text
        caplog.clear()
        # Expected windows: greedy over whole conversations.
        order = [i for i in range(8) if truncation == "right" or i != 6]
        windows, current = [], []
        for i in order:
            if current and sum(min(n[j], seq) for j in current) + min(n[i], seq) > seq:
                windows.append(current)
                current = []
            current.append(i)
        for sample, window in zip(samples, windows):
            tokens = [t for i in window for t in rendered[i][0][:seq]]
            targets = [t for i in window for t in rendered[i][1][:seq]]
            docs = [d for d, i in enumerate(window) for _ in range(min(n[i], seq))]
            used = len(tokens)
            assert sample["tokens"][:used].tolist() == tokens
            assert (sample["tokens"][used:] == tok.pad_id).all()
            assert sample["document_ids"][:used].tolist() == docs
            assert sample["positions"][:used].tolist() == [p for i in window for p in range(min(n[i], seq))]
            shifted = [targets[k + 1] if k + 1 < used and docs[k + 1] == docs[k] else IGNORE_INDEX
                       for k in range(used)]
            assert sample["labels"][:used].tolist() == shifted
            assert (sample["labels"][used:] == IGNORE_INDEX).all()
        if truncation == "right":  # the cut conversation fills a window alone, its reply cut off: no labels
            alone = samples[windows.index([6])]
            assert (alone["labels"] == IGNORE_INDEX).all() and (alone["document_ids"][:seq - 1] == 0).all()


def test_dropping_every_conversation_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """truncation = drop with every conversation of a rank longer than seq_len used to spin through
    epochs forever; a whole epoch that keeps nothing is one line naming both keys."""
    path = write_chats(tmp_path / "c.jsonl", [qa("long " * 100, "x"), qa("longer " * 120, "y")])
    ds = build_dataset(chat_config(path, "--training.seq_len", "64"), 0, 1)
    with pytest.raises(DataError, match=r"^training.truncation = drop: every conversation of data-parallel rank 0 "
                                        r"is longer than training.seq_len 64; set training.truncation = right"):
        next(iter(ds))


def test_chat_resume_is_exact(tmp_path: Path) -> None:
    convs = [qa(f"question {i} " + "w " * (i % 5), f"answer {i}") for i in range(9)]
    cfg = chat_config(write_chats(tmp_path / "c.jsonl", convs), "--training.seq_len", "160",
                      "--training.local_batch_size", "2", "--debug.seed", "2")
    resumed_loader_matches(cfg, skip=2, count=5)  # the 5 cross epochs


BAD_RECORDS = {  # case -> (the bad line, expected message after "<file> line 2: ")
    "no messages": ('{"text": "hi"}', 'no messages \\(a chat record is {"messages": \\[{"role"'),
    "empty messages": ('{"messages": []}', "no messages"),
    "unknown role": ('{"messages": [{"role": "bot", "content": "x"}]}',
                     "message 0 has role 'bot'; valid roles: system, user, assistant, tool"),
    "assistant first": ('{"messages": [{"role": "assistant", "content": "x"}]}',
                        "message 0 is assistant first .* only user can come there"),
    "system later": ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
                     "message 1 is system after a user message; only assistant can come there"),
    "tool after user": ('{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}',
                        "message 1 is tool after a user message"),
    "no assistant": ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
    "content not a string": ('{"messages": [{"role": "user", "content": 3}]}', 'message 0 \\(user\\) has no "content"'),
    "id beyond vocab": ('{"input_ids": [1, 2, 4096]}', r"token id 4096 is outside the model's vocabulary \[0, 2048\)"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_record_is_one_line_naming_file_and_line(tmp_path: Path, case: str) -> None:
    line, message = BAD_RECORDS[case]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": qa("fine", "yes")}) + "\n" + line + "\n")
    pattern = f"training.dataset_path: {path} line 2: {message}"
    with pytest.raises(ValueError, match=pattern) as err:  # before launch: the corpus is small, every record is read
        check_data_config(chat_config(path))
    assert "\n" not in str(err.value)
    it = iter(build_dataset(chat_config(path, "--training.packing", "false"), 0, 1))
    with pytest.raises(DataError, match=pattern):  # a larger corpus: from the data loader, when it gets there
        for _ in range(3):
            next(it)


def random_letter_chats(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [qa(" ".join(rng.choices(string.ascii_lowercase, k=40)), "Noted: random letters.") for _ in range(n)]


def train_runs(rank: int, world: int, runs: list[list[str]]) -> list[list[dict] | None]:
    """Several trainings one after the other in the same processes (one launch)."""
    return [train(rank, world, argv) for argv in runs]


def train_here(monkeypatch, runs: list[list[str]]) -> list[list[dict]]:
    """Trainings in this process, on a process group of one (no process start: seconds, not ten)."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(key, value)
    try:
        return train_runs(0, 1, runs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_prompt_masking_is_what_makes_the_reply_learnable(tmp_path: Path, monkeypatch) -> None:
    """User turns of 40 random letters, one constant reply: with prompts masked only the reply is a
    label and the loss falls near zero within 15 steps; trained on the prompt too it cannot fall
    below the letters' entropy (40 x ln 26 nats over ~115 labels: ~1.1). In this process (a
    process group of one), to keep it to seconds."""
    corpus = write_chats(tmp_path / "letters.jsonl", random_letter_chats(200))
    common = ["--training.dataset", "chat", "--training.dataset_path", str(corpus), "--training.seq_len", "128",
              "--training.local_batch_size", "1", "--training.steps", "15", "--optimizer.lr", "1e-2",
              "--lr_scheduler.decay_type", "none", "--lr_scheduler.min_lr_factor", "0"]
    everything = ["--training.train_on_prompt", "true"]
    masked, unmasked = train_here(monkeypatch, [tiny_args(tmp_path / "masked", *common),
                                                tiny_args(tmp_path / "all", *common, *everything)])
    assert masked[0]["loss"] > 3 and unmasked[0]["loss"] > 3
    assert masked[-1]["loss"] < 0.05, losses(masked)
    assert unmasked[-1]["loss"] > 0.9, losses(unmasked)
    assert masked[-1]["tokens_seen"] * 5 < unmasked[-1]["tokens_seen"]  # ~8 reply labels of ~115 per conversation


def uniform_chats(n: int, length: int) -> list[list[dict]]:
    """n conversations of `length` tokens each (random word salad, filtered by rendered length)."""
    words = "the of and to in is for on with as by at from this that which be or are".split()
    rng, tok, out = random.Random(0), Tokenizer(TOKENIZER), []
    while len(out) < n:
        c = qa(" ".join(rng.choices(words, k=rng.randint(3, 12))), " ".join(rng.choices(words, k=rng.randint(2, 9))))
        if len(render(tok, as_pairs(c), False)[0]) == length:
            out.append(c)
    return out


def test_packed_chat_under_cp_and_dp_equals_one_process(tmp_path: Path, monkeypatch) -> None:
    """Packed chat (several conversations per window, document masks, prompt masks) trains to the
    same losses under cp 2 with every strategy as in one process; one window is a conversation cut
    to seq_len before its reply (no labels at all: it contributes 0, no NaN). dp 2: conversations of
    one length L, 3 per window (3L <= seq_len < 4L), so that a step of dp 2 x 1 window holds the
    same conversations as one process's 2 windows, differently grouped: with document masks and
    per-conversation positions the loss cannot tell. All parallel runs share one 2-process launch."""
    words = "the of and to in is for on with as by at from this that which be or are".split()
    rng = random.Random(1)
    mixed = [qa(" ".join(rng.choices(words, k=rng.randint(2, 40))), " ".join(rng.choices(words, k=rng.randint(1, 30))))
             for _ in range(40)]
    mixed[3] = qa("long " * 300, "never seen")
    varied = write_chats(tmp_path / "varied.jsonl", mixed)
    uniform = write_chats(tmp_path / "uniform.jsonl", uniform_chats(24, 73))
    base = ["--training.dataset", "chat", "--training.seq_len", "256", "--training.steps", "3",
            "--training.truncation", "right"]
    cp_data = [*base, "--training.dataset_path", str(varied), "--training.local_batch_size", "2"]
    dp_data = [*base, "--training.dataset_path", str(uniform)]
    windows = iter(build_dataloader(load_config(tiny_args(tmp_path / "x", *cp_data)), 2048, 0, 1))
    batches = [next(windows)["labels"] for _ in range(3)]
    assert sum(int((b == IGNORE_INDEX).all(dim=1).sum()) for b in batches) == 1  # the cut conversation's window
    ref_cp, ref_dp = train_here(monkeypatch, [tiny_args(tmp_path / "ref-cp", *cp_data), tiny_args(
        tmp_path / "ref-dp", *dp_data, "--training.local_batch_size", "2")])
    cases = {f"cp2-{s}-u{u}": ["--parallelism.context_parallel_degree", "2",
                               "--parallelism.context_parallel_strategy", s,
                               "--parallelism.context_parallel_ulysses_degree", str(u)]
             for s, u in (("ring", 1), ("ulysses", 1), ("usp", 2), ("usp", 1), ("allgather", 1))}
    runs = [tiny_args(tmp_path / name, *cp_data, *extra) for name, extra in cases.items()]
    runs.append(tiny_args(tmp_path / "dp2", *dp_data, "--training.local_batch_size", "1"))
    results = run_distributed(train_runs, 2, runs)[0]
    for name, metrics in zip(cases, results):
        assert_close(losses(metrics), losses(ref_cp), 1e-5), name
        assert [m["tokens_seen"] for m in metrics] == [m["tokens_seen"] for m in ref_cp], name
    assert_close(losses(results[-1]), losses(ref_dp), 1e-5)
    assert [m["tokens_seen"] for m in results[-1]] == [m["tokens_seen"] for m in ref_dp]
