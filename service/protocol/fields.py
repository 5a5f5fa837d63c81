"""Which request fields OpenAI defines, per object, as the official `openai` package's types name them.

The request models declare the fields this server implements; a field OpenAI
defines that a model does not declare is refused (400, `param` names it), as is
a field nobody defines (OpenAI's own API answers those with a 400 too).  The
lists are checked against the `openai` package in tests/service/test_openai_fields.py,
so a field OpenAI adds is classified on purpose, not by accident.

A few fields OpenAI defines change nothing here and are accepted: `NO_EFFECT`.
"""

from __future__ import annotations

# openai.types.completion_create_params.CompletionCreateParamsBase
COMPLETION_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "best_of",
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "suffix",
        "temperature",
        "top_p",
        "user",
    }
)

# openai.types.chat.completion_create_params.CompletionCreateParamsBase
CHAT_FIELDS = frozenset(
    {
        "messages",
        "model",
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "modalities",
        "moderation",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)

# the union of openai.types.chat.ChatCompletionMessageParam's members
MESSAGE_FIELDS = frozenset(
    {"role", "content", "name", "audio", "function_call", "refusal", "tool_calls", "tool_call_id"}
)

# openai.types.chat.ChatCompletionStreamOptionsParam
STREAM_OPTIONS_FIELDS = frozenset({"include_usage", "include_obfuscation"})

# Identify the caller, label or keep the request at OpenAI, or hint its prompt cache: nothing a model computes.
NO_EFFECT = frozenset({"user", "safety_identifier", "metadata", "store", "prompt_cache_key"})

OPENAI_FIELDS = COMPLETION_FIELDS | CHAT_FIELDS | MESSAGE_FIELDS | STREAM_OPTIONS_FIELDS


def refusal_reason(name: str) -> str:
    """Why a field a request model does not declare is refused."""
    if name in OPENAI_FIELDS:
        return "OpenAI defines this parameter; this server does not implement it"
    return "unrecognized request argument (this server refuses what it does not implement rather than ignore it)"
