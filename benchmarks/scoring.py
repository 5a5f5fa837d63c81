"""Multiple-choice scoring by log-likelihood, as in the paper's QA evaluation.

An item is a prompt and a few labelled choices; each choice is scored by the
sum of the log-probabilities of its tokens after the prompt, and the item is
answered by the highest-scoring choice.  Prompt and choice are tokenised exactly
as training tokenises a prompt→completion pair (merger.train.data), so the
chat template and end-of-turn token are the ones the adapter was trained on.

One batch of items costs two forward passes: the left-padded prompts once (with
a KV cache, keeping only the last position's logits), then every (item, choice)
pair's choice tokens on a copy of its prompt's cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from merger.probes import position_ids
from merger.train.data import IGNORE_INDEX, text_pair, tokenize_pair
from merger.train.tasks import TaskExample

MAX_LENGTH = 1024


@dataclasses.dataclass(frozen=True)
class EncodedItem:
    prompt_ids: tuple[int, ...]
    choice_ids: tuple[tuple[int, ...], ...]  # each choice's completion tokens, end-of-turn included
    answer: int


def _record(example: TaskExample, choice: str, tokenizer) -> dict:
    if getattr(tokenizer, "chat_template", None):
        return {"messages": [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": choice}]}
    return {"prompt": example.prompt, "completion": choice}


def encode_item(tokenizer, example: TaskExample) -> EncodedItem:
    """Tokenise every choice as training tokenises a completion; the prompt tokens are shared."""
    prompt, choices = None, []
    for choice in example.choices:
        tokens = tokenize_pair(
            text_pair(_record(example, choice, tokenizer), tokenizer, example.prompt),
            tokenizer,
            MAX_LENGTH,
            example.prompt,
        )
        split = tokens.labels.count(IGNORE_INDEX)
        prompt = tokens.input_ids[:split]
        choices.append(tokens.input_ids[split:])
    return EncodedItem(prompt, tuple(choices), example.answer)


@dataclasses.dataclass(frozen=True)
class ScoredBatch:
    choice_logprobs: list[list[float]]  # per item, per choice: sum of log p(choice tokens | prompt)
    logits: torch.Tensor  # (positions, vocab) float32: every position that predicts a choice token, once

    def predictions(self) -> list[int]:
        return [max(range(len(scores)), key=scores.__getitem__) for scores in self.choice_logprobs]


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (rows, longest), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (rows, longest), padded on the right."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@torch.inference_mode()
def score_batch(model: nn.Module, items: Sequence[EncodedItem], pad_id: int) -> ScoredBatch:
    """Log-likelihood of every choice of every item, and the logits that produced them."""
    prompt_ids, prompt_mask = left_padded([item.prompt_ids for item in items], pad_id)  # (B, P)
    prompt_out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    last = prompt_out.logits[:, -1].float()  # (B, V): predicts each choice's first token
    owner = torch.tensor([i for i, item in enumerate(items) for _ in item.choice_ids])  # (N,) item of each pair
    cache = prompt_out.past_key_values
    cache.batch_select_indices(owner)
    choice_ids, choice_mask = right_padded([c for item in items for c in item.choice_ids], pad_id)  # (N, L)
    mask = torch.cat([prompt_mask[owner], choice_mask], dim=1)  # (N, P + L)
    positions = prompt_mask.sum(dim=1)[owner, None] + torch.arange(choice_ids.shape[1])  # (N, L)
    later = (
        model(input_ids=choice_ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        .logits[:, :-1]
        .float()
    )  # (N, L - 1, V): predicts choice tokens 1..
    predicting = torch.cat([last[owner, None], later], dim=1)  # (N, L, V): position j predicts choice token j
    token_logprobs = torch.log_softmax(predicting, dim=-1).gather(-1, choice_ids[..., None]).squeeze(-1)  # (N, L)
    sums = (token_logprobs * choice_mask).sum(dim=1).tolist()  # (N,)
    return ScoredBatch(_per_item(sums, items), torch.cat([last, later[choice_mask[:, 1:].bool()]]))


def _per_item(flat: list[float], items: Sequence[EncodedItem]) -> list[list[float]]:
    it = iter(flat)
    return [[next(it) for _ in item.choice_ids] for item in items]


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
