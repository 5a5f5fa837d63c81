"""The fidelity benchmark's scoring and variants, on a tiny Llama in seconds."""

from __future__ import annotations

import pytest
import torch

from benchmarks.fidelity import REFERENCE, Workspace, build_unmerged, evaluate_task
from benchmarks.scoring import EncodedItem, encode_item, score_batch
from merger.probes import load_tokenizer
from merger.train.tasks import DEMO_TASKS
from tests.support.adapters import write_random_adapter

PROMPTS = ((5, 9, 14, 3), (7, 2), (11, 4, 8, 21, 6, 30, 12))  # token ids, different lengths on purpose
CHOICE_TOKENS = 3


@pytest.fixture(scope="module")
def tiny(tiny_base, tmp_path_factory):
    base = tiny_base("llama")
    adapter = write_random_adapter(tmp_path_factory.mktemp("fidelity-adapter"), base, relative_size=0.05, seed=3)
    return base, adapter


def greedy_and_least_likely(model, prompt: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The model's own greedy continuation, and the least likely token at each step of its own path."""
    greedy, unlikely = [], []
    for _ in range(CHOICE_TOKENS):
        logits = model(input_ids=torch.tensor([list(prompt) + greedy])).logits[0, -1]
        greedy.append(int(logits.argmax()))
        unlikely.append(int(logits.argmin()))
    return tuple(greedy), tuple(unlikely)


@pytest.fixture(scope="module")
def planted(tiny, tmp_path_factory):
    """Items whose right answer (at a different index in each) is the reference model's own greedy text."""
    base, adapter = tiny
    model = build_unmerged(Workspace(base, adapter, tmp_path_factory.mktemp("scratch")), torch.float32)
    items = []
    with torch.inference_mode():
        for answer, prompt in enumerate(PROMPTS):
            greedy, unlikely = greedy_and_least_likely(model, prompt)
            choices = [unlikely, unlikely[:1], tuple(reversed(unlikely))]
            choices.insert(answer, greedy)
            items.append(EncodedItem(prompt, tuple(choices), answer))
    return model, items


def full_sequence_logprob(model, prompt: tuple[int, ...], choice: tuple[int, ...]) -> float:
    logits = model(input_ids=torch.tensor([list(prompt) + list(choice)])).logits[0].float()  # (seq, vocab)
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(prompt) - 1 + j, token]) for j, token in enumerate(choice))


@torch.inference_mode()
def test_batched_scores_equal_one_sequence_at_a_time(planted):
    model, items = planted
    scored = score_batch(model, items, pad_id=0)
    for item, scores in zip(items, scored.choice_logprobs, strict=True):
        expected = [full_sequence_logprob(model, item.prompt_ids, choice) for choice in item.choice_ids]
        assert scores == pytest.approx(expected, abs=1e-4)


def test_scorer_ranks_the_planted_answer_first(planted):
    model, items = planted
    assert score_batch(model, items, pad_id=0).predictions() == [item.answer for item in items]


def test_merged_fp32_answers_like_unmerged(tiny, planted):
    base, adapter = tiny
    _, items = planted
    rows = evaluate_task(base, adapter, items, pad_id=0, batch_size=2)["variants"]
    assert rows[REFERENCE]["accuracy"] == 100.0
    assert rows["merged-fp32"]["gap_points"] == 0.0 and rows["merged-fp32"]["flips_vs_peer"] == 0
    assert rows["merged-fp32"]["max_abs_logit_diff"] < 1e-4
    assert rows["merged-fp32"]["top1_agreement"] == 1.0
    assert rows["merged-bf16"]["max_abs_logit_diff"] > rows["merged-fp32"]["max_abs_logit_diff"]


def test_demo_items_tokenise_like_training(tiny):
    base, _ = tiny
    tokenizer = load_tokenizer(base)
    example = DEMO_TASKS["date-iso"].examples("eval", 1)[0]
    item = encode_item(tokenizer, example)
    assert len(item.choice_ids) == len(example.choices) and item.answer == example.answer
    assert tokenizer.decode(item.choice_ids[item.answer]).startswith(example.completion)
