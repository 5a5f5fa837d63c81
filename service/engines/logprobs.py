"""Log-probabilities from a model's raw logits, as vLLM reports them (its default `raw_logprobs` mode).

They come from the logits before temperature, top-p or any other sampling step, in float32: the
model's own distribution, which is what a harness scoring log-likelihoods needs.
"""

from __future__ import annotations

import torch

from service.engines.base import TokenLogprob


def position_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top_k: int) -> list[TokenLogprob]:
    """Per row: the logprob and rank of token_ids[row] and the top_k most likely tokens.

    logits: (rows, vocab), token_ids: (rows,)
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (rows, vocab)
    chosen = logprobs.gather(-1, token_ids[:, None])  # (rows, 1)
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # (rows,)
    top_values, top_ids = logprobs.topk(top_k, dim=-1) if top_k else (logprobs[:, :0], token_ids[:, None][:, :0])
    return [
        TokenLogprob(
            token_id=int(token),
            logprob=float(value),
            rank=int(rank),
            top=tuple(zip(ids.tolist(), values.tolist(), strict=True)),
        )
        for token, value, rank, ids, values in zip(
            token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist(), top_ids, top_values, strict=True
        )
    ]


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top_k: int) -> tuple[TokenLogprob | None, ...]:
    """Teacher-forced logprobs of the prompt's tokens; None for the first, which nothing predicts.

    logits: (prompt, vocab), the model's output at every prompt position
    """
    targets = torch.tensor(prompt_ids[1:])  # (prompt - 1,)
    return (None, *position_logprobs(logits[:-1], targets, top_k))
