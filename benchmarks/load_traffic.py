"""The load test's traffic: completions and chats for every model, streamed or not, each checked against its reference.

A reference (SPEC §6) is transformers' greedy answer on the merger's merged
checkpoint of an adapter (or on the base itself).  A chat's prompt is rendered
by the service's own `ChatTokenizer` on the base (service/engines/tokenizer.py),
exactly as the server renders it, and completed like any prompt.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import httpx

from merger.merge import merge
from service.engines.tokenizer import ChatTokenizer
from tests.support.adapters import write_random_adapter
from tests.support.live import INFERENCE_HEADERS
from tests.support.references import hf_greedy

ADAPTERS = {
    "qv": (["q_proj", "v_proj"], 1),
    "qkvo": (["q_proj", "k_proj", "v_proj", "o_proj"], 2),
    "o": (["o_proj"], 3),
}
LONG = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps, listening to the sea "
    "against the rocks below, and thinking about the ships that passed in the night. "
) * 6
PROMPTS = ("The capital of France is", "def fibonacci(n):", LONG + "What did the keeper count?")
CHATS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer with code only."},
        {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."},
    ],
    [{"role": "user", "content": LONG + "What did the keeper count?"}],
)
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MAX_TOKENS = 16

References = dict[str, dict[str, list[str]]]  # model -> endpoint -> answer to PROMPTS[i] or CHATS[i]


@dataclasses.dataclass(frozen=True)
class Ask:
    """One request of the mix: which model, which endpoint, which prompt (or chat), streamed or not."""

    model: str
    endpoint: str
    index: int
    stream: bool

    @classmethod
    def random(cls, rng: random.Random, models: list[str]) -> Ask:
        return cls(rng.choice(models), rng.choice(list(ENDPOINTS)), rng.randrange(len(PROMPTS)), rng.random() < 0.5)

    def body(self) -> dict:
        text = {"prompt": PROMPTS[self.index]} if self.endpoint == "completions" else {"messages": CHATS[self.index]}
        return {"model": self.model, **text, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": self.stream}


def chat_prompts(base: Path) -> tuple[str, ...]:
    """CHATS as the server renders them for the engine."""
    tokenizer = ChatTokenizer(base)
    return tuple(tokenizer.apply_chat_template(messages) for messages in CHATS)


def reference_answers(model_dir: Path, chat_texts: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        "completions": hf_greedy(model_dir, PROMPTS, MAX_TOKENS),
        "chat": hf_greedy(model_dir, chat_texts, MAX_TOKENS),
    }


def build_adapters(base: Path, root: Path) -> tuple[dict[str, Path], References]:
    """(name -> artifact folder, model -> endpoint -> reference answers)."""
    chat_texts = chat_prompts(base)
    artifacts, references = {}, {base.resolve().name: reference_answers(base, chat_texts)}
    for name, (targets, seed) in ADAPTERS.items():
        artifacts[name] = write_random_adapter(root / name, base, seed=seed, relative_size=0.05, targets=targets)
        merge(base, artifacts[name], root / f"{name}-merged", progress=False)
        references[name] = reference_answers(root / f"{name}-merged", chat_texts)
    return artifacts, references


def client() -> httpx.Client:
    """One client's connection, kept alive between its requests (as OpenAI's SDK does)."""
    return httpx.Client(headers=INFERENCE_HEADERS, timeout=300)


def answer(http: httpx.Client, url: str, ask: Ask) -> tuple[int, str]:
    """(status, the answer's text; empty unless 200)."""
    if ask.stream:
        return streamed_answer(http, url, ask)
    response = http.post(f"{url}{ENDPOINTS[ask.endpoint]}", json=ask.body())
    return response.status_code, response_text(ask, response)


def response_text(ask: Ask, response: httpx.Response) -> str:
    """A non-streamed answer's text; empty unless 200."""
    if response.status_code != 200:
        return ""
    choice = response.json()["choices"][0]
    return choice["text"] if ask.endpoint == "completions" else choice["message"]["content"]


def streamed_answer(http: httpx.Client, url: str, ask: Ask) -> tuple[int, str]:
    with http.stream("POST", f"{url}{ENDPOINTS[ask.endpoint]}", json=ask.body()) as response:
        if response.status_code != 200:
            return response.status_code, ""
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-1]
    choices = [choice for event in events[:-1] for choice in json.loads(event)["choices"]]
    return 200, "".join(choice_text(choice) for choice in choices)


def choice_text(choice: dict) -> str:
    """A streamed choice's text: `text` for a completion, `delta.content` for a chat (absent or null: none)."""
    return choice["text"] if "text" in choice else choice["delta"].get("content") or ""


def matches(references: References, ask: Ask, text: str) -> bool:
    return text == references[ask.model][ask.endpoint][ask.index]


def every_ask(references: References) -> list[Ask]:
    """Each model, endpoint and prompt once, not streamed (the warm-up, and the recovery check)."""
    return [
        Ask(model, endpoint, index, False)
        for model in references
        for endpoint in ENDPOINTS
        for index in range(len(PROMPTS))
    ]
