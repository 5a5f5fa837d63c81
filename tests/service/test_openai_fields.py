"""The request fields OpenAI defines, as this server classifies them, are exactly the official `openai` package's.

A field the package adds fails here until it is implemented or refused on purpose (service/protocol/fields.py).
"""

from __future__ import annotations

import typing

import openai.types.chat.completion_create_params as chat_params
import openai.types.completion_create_params as completion_params
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionStreamOptionsParam

from service.protocol.chat import ChatCompletionRequest, ChatMessage
from service.protocol.completions import CompletionRequest
from service.protocol.fields import CHAT_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS, NO_EFFECT, STREAM_OPTIONS_FIELDS


def keys(typed_dict) -> set[str]:
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


def test_the_tables_list_the_openai_packages_fields():
    assert keys(completion_params.CompletionCreateParamsBase) | {"stream"} == COMPLETION_FIELDS
    assert keys(chat_params.CompletionCreateParamsBase) | {"stream"} == CHAT_FIELDS
    assert set().union(*(keys(m) for m in typing.get_args(ChatCompletionMessageParam))) == MESSAGE_FIELDS
    assert keys(ChatCompletionStreamOptionsParam) == STREAM_OPTIONS_FIELDS


def test_what_is_implemented_and_what_is_refused():
    """The README's lists: completions implement every OpenAI field but `suffix`; chat refuses these."""
    assert COMPLETION_FIELDS - set(CompletionRequest.model_fields) == {"suffix"}
    assert CHAT_FIELDS - set(ChatCompletionRequest.model_fields) == {
        "audio",
        "function_call",
        "functions",
        "modalities",
        "moderation",
        "parallel_tool_calls",
        "prediction",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "service_tier",
        "tool_choice",
        "tools",
        "verbosity",
        "web_search_options",
    }
    assert MESSAGE_FIELDS - set(ChatMessage.model_fields) == {
        "name",
        "audio",
        "function_call",
        "refusal",
        "tool_calls",
        "tool_call_id",
    }
    assert set(ChatCompletionRequest.model_fields) >= NO_EFFECT and "user" in CompletionRequest.model_fields
