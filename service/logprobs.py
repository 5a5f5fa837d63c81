"""Engine logprobs (TokenLogprob) in the wire shapes: completions' legacy lists, chat's content list, and vLLM's
`prompt_logprobs`.

Tokens are named by their own decoding (special tokens included), as vLLM names
them.  A logprob of -inf is sent as -9999.0, OpenAI's value for "very unlikely"
(JSON has no infinity).  The completions' `top_logprobs` of a position holds the
token there and the k most likely (so up to k + 1 entries), as OpenAI and vLLM do.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from service.engines.base import TokenLogprob
from service.engines.tokenizer import ChatTokenizer
from service.protocol.chat import ChatLogprobs, TokenLogprobContent, TopLogprob
from service.protocol.completions import CompletionLogProbs, PromptLogprob

FLOOR = -9999.0


def finite(logprob: float) -> float:
    return max(logprob, FLOOR)


def completion_logprobs(
    tokenizer: ChatTokenizer,
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprob | None],
    top_k: int,
    first_offset: int = 0,
) -> CompletionLogProbs:
    """Legacy completions logprobs of a run of tokens; `first_offset`: the text offset of the first one."""
    texts = tokenizer.token_texts(token_ids)
    offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=first_offset))
    return CompletionLogProbs(
        text_offset=offsets if texts else [],
        tokens=texts,
        token_logprobs=[None if lp is None else finite(lp.logprob) for lp in logprobs],
        top_logprobs=[None if lp is None else _top_dict(tokenizer, lp, top_k) for lp in logprobs],
    )


def _top_dict(tokenizer: ChatTokenizer, logprob: TokenLogprob, top_k: int) -> dict[str, float]:
    entries = [(logprob.token_id, logprob.logprob), *logprob.top[:top_k]]
    texts = tokenizer.token_texts([token for token, _ in entries])
    return {text: finite(value) for text, (_, value) in zip(texts, entries, strict=True)}


def prompt_logprobs_extension(
    tokenizer: ChatTokenizer, logprobs: Sequence[TokenLogprob | None], top_k: int
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: logprob, rank, decoded_token} of the
    token there and the top_k most likely."""
    return [None if lp is None else _prompt_entry(tokenizer, lp, top_k) for lp in logprobs]


def _prompt_entry(tokenizer: ChatTokenizer, logprob: TokenLogprob, top_k: int) -> dict[str, PromptLogprob]:
    top = logprob.top[:top_k]
    texts = tokenizer.token_texts([logprob.token_id, *(token for token, _ in top)])
    own = PromptLogprob(logprob=finite(logprob.logprob), rank=logprob.rank, decoded_token=texts[0])
    entry = {str(logprob.token_id): own}
    for rank, ((token, value), text) in enumerate(zip(top, texts[1:], strict=True), start=1):
        entry.setdefault(str(token), PromptLogprob(logprob=finite(value), rank=rank, decoded_token=text))
    return entry


def chat_logprobs(
    tokenizer: ChatTokenizer, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob], top_k: int
) -> ChatLogprobs:
    """Chat's `logprobs.content`: per generated token its text, logprob, UTF-8 bytes and the top_k most likely."""
    texts = tokenizer.token_texts(token_ids)
    return ChatLogprobs(
        content=[
            TokenLogprobContent(
                token=text,
                logprob=finite(lp.logprob),
                bytes=list(text.encode()),
                top_logprobs=_chat_top(tokenizer, lp, top_k),
            )
            for text, lp in zip(texts, logprobs, strict=True)
        ]
    )


def _chat_top(tokenizer: ChatTokenizer, logprob: TokenLogprob, top_k: int) -> list[TopLogprob]:
    top = logprob.top[:top_k]
    texts = tokenizer.token_texts([token for token, _ in top])
    return [
        TopLogprob(token=text, logprob=finite(value), bytes=list(text.encode()))
        for text, (_, value) in zip(texts, top, strict=True)
    ]
