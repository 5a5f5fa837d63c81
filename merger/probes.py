"""The fixed probe set of `d2lora verify` and the two ways a model is run on it.

Eight short, varied prompts (facts, code, arithmetic, a list, JSON, prose, a
question; the eighth goes through the base's chat template when it has one),
tokenized by the base's tokenizer and left-padded into one batch.  Both models
are run (1) greedily for NEW_TOKENS tokens and (2) teacher-forced on the same
token sequences (prompt + the reference's greedy continuation), so their
logits are compared position by position on identical inputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from merger.errors import D2LoraError

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


@torch.inference_mode()
def greedy_continuations(model: nn.Module, probes: ProbeBatch, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    """Exactly new_tokens greedy tokens per probe, with a KV cache; EOS does not stop it.  -> (probes, new_tokens)"""
    mask = probes.attention_mask  # (probes, seq)
    out = model(input_ids=probes.input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
    tokens = [out.logits[:, -1].argmax(dim=-1, keepdim=True)]  # [(probes, 1)]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
        out = model(
            input_ids=tokens[-1],
            attention_mask=mask,
            position_ids=position_ids(mask)[:, -1:],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        tokens.append(out.logits[:, -1].argmax(dim=-1, keepdim=True))
    return torch.cat(tokens, dim=1)  # (probes, new_tokens)


@torch.inference_mode()
def teacher_forced_logits(model: nn.Module, probes: ProbeBatch, continuation: torch.Tensor) -> torch.Tensor:
    """Float32 logits at every non-pad position of prompt + continuation.  -> (positions, vocab)"""
    input_ids = torch.cat([probes.input_ids, continuation], dim=1)  # (probes, seq)
    mask = torch.cat([probes.attention_mask, torch.ones_like(continuation)], dim=1)  # (probes, seq)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask))
    return out.logits[mask.bool()].float()  # (probes, seq, vocab) -> (positions, vocab)
