"""Training data: a JSONL file of prompt→completion examples, tokenised with loss masks.

Each non-blank line is one JSON object, either
    {"prompt": "...", "completion": "..."}            (eos is appended to the completion)
or  {"messages": [{"role": ..., "content": ...}, ...]} (the base's chat template; the
                                                       last message, the assistant's, is the completion)
Other keys are ignored.  Loss is taken on the completion tokens only.  Every
problem is reported with its line number as a DataError.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from merger.errors import D2LoraError

MAX_LINE_BYTES = 1 << 20
IGNORE_INDEX = -100  # the label transformers' loss skips


class DataError(D2LoraError):
    """The training data file is unreadable or holds a bad example."""


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX on prompt tokens


@dataclasses.dataclass(frozen=True)
class TextPair:
    prompt: str
    completion: str
    append_eos: bool  # chat completions end with the template's own end-of-turn token


def _decode_line(raw: bytes, where: str) -> str:
    if len(raw) > MAX_LINE_BYTES:
        raise DataError(f"{where}: line is {len(raw)} bytes, over the limit of {MAX_LINE_BYTES}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not valid UTF-8 (byte {err.start})") from None


def _parse_object(text: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be a JSON object, got {type(record).__name__}")
    return record


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for every non-blank line; where = 'FILE line N'."""
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise DataError(f"--data: cannot read {path} ({err.strerror})") from None
    records = []
    for number, raw in enumerate(lines, start=1):
        where = f"{path.name} line {number}"
        text = _decode_line(raw, where)
        if text.strip():
            records.append((where, _parse_object(text, where)))
    if not records:
        raise DataError(f"--data: {path} holds no examples")
    return records


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f'{where}: "messages" must be a list of at least two messages')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise DataError(f'{where}: messages[{i}] needs string "role" and "content"')
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise DataError(f'{where}: the last message must be a non-empty "assistant" message (the completion)')
    return messages


def _chat_pair(messages: list[dict[str, str]], tokenizer, where: str) -> TextPair:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f'{where}: "messages" needs a base model with a chat template')
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the conversation")
    return TextPair(prompt, full[len(prompt) :], append_eos=False)


def text_pair(record: dict[str, Any], tokenizer, where: str) -> TextPair:
    """The prompt and completion text of one record, in either format."""
    if "messages" in record:
        return _chat_pair(_check_messages(record["messages"], where), tokenizer, where)
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f'{where}: needs string "prompt" and "completion" fields, or "messages"')
    if not completion:
        raise DataError(f'{where}: "completion" is empty')
    return TextPair(prompt, completion, append_eos=True)


def tokenize_pair(pair: TextPair, tokenizer, max_length: int, where: str) -> Example:
    """Prompt and completion tokenised apart (as at inference), labels only on the completion."""
    prompt_ids = tokenizer(pair.prompt, add_special_tokens=pair.append_eos)["input_ids"]
    completion_ids = tokenizer(pair.completion, add_special_tokens=False)["input_ids"]
    if pair.append_eos:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    length = len(prompt_ids) + len(completion_ids)
    if length > max_length:
        raise DataError(f"{where}: example is {length} tokens, over --max-length {max_length}")
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return Example(tuple(prompt_ids + completion_ids), tuple(labels))


def load_examples(path: str | Path, tokenizer, max_length: int) -> list[Example]:
    """Every example of the JSONL file, tokenised; DataError names the first bad line."""
    return [
        tokenize_pair(text_pair(record, tokenizer, where), tokenizer, max_length, where)
        for where, record in read_records(path)
    ]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, all (batch, longest)."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """The epoch's shuffled batches, the same for the same (seed, epoch)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [[examples[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
