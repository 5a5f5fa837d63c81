"""The fixed probe set of `d2lora verify` and the ways a model is run on it.

Eight short, varied prompts (facts, code, arithmetic, a list, JSON, prose, a
question; the eighth goes through the base's chat template when it has one),
tokenized by the base's tokenizer and left-padded into one batch.  A model is
run (1) greedily for NEW_TOKENS tokens with a KV cache, keeping its logits at
every position of prompt + path (one step past the last token, so they are the
positions a teacher-forced run has), and (2) teacher-forced on prompt + a
given continuation, so two models' logits are compared position by position
on identical inputs.  Each exists for a whole transformers model
(greedy_decode, teacher_forced_logits) and for merger.streaming's models
stepping through the layers together (streamed_decode, streamed_forced_hidden):
the same calls, the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from merger.errors import D2LoraError
from merger.streaming import StreamedModel, lockstep_layers

NEW_TOKENS = 32
PLAIN_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Translate to French: The cat sleeps on the mat.",
    "1, 1, 2, 3, 5, 8, 13,",
    '{"name": "Ada Lovelace", "born": 1815, "field":',
    "Once upon a time, in a small village by the sea,",
    "Q: At what temperature does water boil at sea level?\nA:",
)
CHAT_MESSAGES = ({"role": "user", "content": "Give me three short tips for writing clear code."},)
CHAT_FALLBACK = "Three short tips for writing clear code:\n1."


class ProbeError(D2LoraError):
    """The base model's tokenizer cannot be loaded or used for the probes."""


@dataclasses.dataclass(frozen=True)
class ProbeBatch:
    texts: tuple[str, ...]
    input_ids: torch.Tensor  # (probes, prompt_len), left-padded
    attention_mask: torch.Tensor  # (probes, prompt_len)
    pad_token_id: int


def load_tokenizer(base_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as err:
        raise ProbeError(f"{base_dir}: no usable tokenizer for the probe prompts ({err})") from None


def probe_texts(tokenizer) -> tuple[str, ...]:
    """The seven plain prompts and the chat prompt, rendered by the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(list(CHAT_MESSAGES), add_generation_prompt=True, tokenize=False)
    else:
        chat = CHAT_FALLBACK
    return (*PLAIN_PROMPTS, chat)


def _pad_token_id(tokenizer) -> int:
    candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    return next((int(c) for c in candidates if c is not None), 0)


def build_probes(tokenizer) -> ProbeBatch:
    """Tokenize the probe texts (chat text already carries its special tokens) into one left-padded batch."""
    texts = probe_texts(tokenizer)
    pad = _pad_token_id(tokenizer)
    rows = [tokenizer(t, add_special_tokens=i < len(PLAIN_PROMPTS))["input_ids"] for i, t in enumerate(texts)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])  # (probes, width)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (probes, width)
    return ProbeBatch(texts, input_ids, mask, pad)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (pads sit at 0).  (probes, seq) -> (probes, seq)"""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A model's greedy decode of the probes."""

    path: torch.Tensor  # (probes, new): its greedy tokens
    states: torch.Tensor  # (positions, ·): logits (whole model) or last hidden states (streamed), at every
    # non-pad position of prompt + path, in the order teacher_forced_logits gives them


def _decoded_positions(probes: ProbeBatch, path: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
    """The steps' outputs [(probes, cols, ·)] joined and taken at prompt + path's non-pad positions."""
    _, mask = forced_inputs(probes, path)  # (probes, seq)
    return torch.cat(columns, dim=1)[mask.bool()]  # (probes, seq, ·) -> (positions, ·)


@torch.inference_mode()
def greedy_decode(model: nn.Module, probes: ProbeBatch, new_tokens: int = NEW_TOKENS) -> Decoded:
    """Exactly new_tokens greedy tokens per probe, with a KV cache (EOS does not stop it), and the float32
    logits of every step; one step more than the tokens, so the last token's position has logits too."""
    mask = probes.attention_mask  # (probes, seq)
    out = model(input_ids=probes.input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
    logits = [out.logits.float()]  # [(probes, seq, vocab)], then [(probes, 1, vocab)]
    tokens: list[torch.Tensor] = []  # [(probes, 1)]
    for _ in range(new_tokens):
        tokens.append(logits[-1][:, -1].argmax(dim=-1, keepdim=True))
        mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
        out = model(
            input_ids=tokens[-1],
            attention_mask=mask,
            position_ids=position_ids(mask)[:, -1:],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        logits.append(out.logits.float())
    path = torch.cat(tokens, dim=1)  # (probes, new_tokens)
    return Decoded(path, _decoded_positions(probes, path, logits))


def forced_inputs(probes: ProbeBatch, continuation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + continuation and its mask.  continuation: (probes, new) -> (probes, seq) twice"""
    input_ids = torch.cat([probes.input_ids, continuation], dim=1)
    return input_ids, torch.cat([probes.attention_mask, torch.ones_like(continuation)], dim=1)


@torch.inference_mode()
def teacher_forced_logits(model: nn.Module, probes: ProbeBatch, continuation: torch.Tensor) -> torch.Tensor:
    """Float32 logits at every non-pad position of prompt + continuation.  -> (positions, vocab)"""
    input_ids, mask = forced_inputs(probes, continuation)  # (probes, seq)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask))
    return out.logits[mask.bool()].float()  # (probes, seq, vocab) -> (positions, vocab)


def continuation_top1(argmax: torch.Tensor, probes: ProbeBatch, continuation: torch.Tensor) -> torch.Tensor:
    """The model's own next token at each step of a teacher-forced continuation, from its argmax at every
    non-pad position.  (positions,) -> (probes, new)

    Column t is its argmax after prompt + continuation[:, :t]: where every earlier column equals the
    continuation, that is the token its own greedy decode picks next.
    """
    _, mask = forced_inputs(probes, continuation)  # (probes, seq)
    top1 = torch.full(mask.shape, -1, dtype=torch.long)
    top1[mask.bool()] = argmax
    first = probes.input_ids.shape[1] - 1  # left-padded: every prompt ends in this column
    return top1[:, first : first + continuation.shape[1]]


AfterLayer = Callable[[int], None]


@torch.inference_mode()
def streamed_decode(
    models: Sequence[StreamedModel],
    probes: ProbeBatch,
    new_tokens: int = NEW_TOKENS,
    after_layer: AfterLayer | None = None,
) -> list[Decoded]:
    """greedy_decode for each model, the models stepping through the layers together; each one's last hidden
    states (StreamedModel.logits turns them into greedy_decode's logits) instead of its logits."""
    mask = probes.attention_mask  # (probes, seq)
    steps = [probes.input_ids] * len(models)  # [(probes, seq)], then [(probes, 1)]
    caches: list[object | None] = [None] * len(models)
    positions = position_ids(mask)
    tokens: list[list[torch.Tensor]] = [[] for _ in models]  # per model [(probes, 1)]
    columns: list[list[torch.Tensor]] = [[] for _ in models]  # per model, each step's (probes, cols, hidden)
    for step in range(new_tokens + 1):
        captured = [
            m.capture(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            for m, ids, cache in zip(models, steps, caches, strict=True)
        ]
        hidden = lockstep_layers(models, captured, after_layer)  # [(probes, seq, hidden)]
        for kept, h in zip(columns, hidden, strict=True):
            kept.append(h)
        if step == new_tokens:
            break
        steps = [m.logits(h[:, -1]).argmax(dim=-1, keepdim=True) for m, h in zip(models, hidden, strict=True)]
        caches = [c.cache for c in captured]
        for chosen, token in zip(tokens, steps, strict=True):
            chosen.append(token)
        mask = torch.cat([mask, torch.ones_like(steps[0])], dim=1)
        positions = position_ids(mask)[:, -1:]
    paths = [torch.cat(chosen, dim=1) for chosen in tokens]  # [(probes, new_tokens)]
    return [Decoded(p, _decoded_positions(probes, p, c)) for p, c in zip(paths, columns, strict=True)]


@torch.inference_mode()
def streamed_forced_hidden(
    models: Sequence[StreamedModel],
    probes: ProbeBatch,
    continuations: Sequence[torch.Tensor],
    after_layer: AfterLayer | None = None,
) -> list[torch.Tensor]:
    """Each model teacher-forced on prompt + its continuation, together; the last hidden states at every
    non-pad position (StreamedModel.logits turns them into teacher_forced_logits).  -> [(positions, hidden)]"""
    forced = [forced_inputs(probes, c) for c in continuations]
    captured = [
        m.capture(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        for m, (ids, mask) in zip(models, forced, strict=True)
    ]
    hidden = lockstep_layers(models, captured, after_layer)  # [(probes, seq, hidden)]
    return [h[mask.bool()] for h, (_, mask) in zip(hidden, forced, strict=True)]
