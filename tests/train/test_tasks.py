"""Demo tasks: deterministic, held-out eval with labelled choices, data the trainer accepts, idempotent adapters."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import AutoTokenizer

from merger.train.data import load_examples
from merger.train.tasks import (
    DEMO_TASKS,
    DEMO_TRAIN_CONFIG,
    EVAL_SIZE,
    TRAIN_SIZE,
    build_demo_adapters,
    write_task_data,
)


@pytest.mark.parametrize("name", list(DEMO_TASKS))
def test_a_task_always_yields_the_same_examples(name):
    task = DEMO_TASKS[name]
    assert task.examples("train", 16) == task.examples("train", 16)
    assert task.examples("eval", 8) == task.examples("eval", 8)


@pytest.mark.parametrize("name", list(DEMO_TASKS))
def test_eval_items_are_held_out_and_labelled(name):
    task = DEMO_TASKS[name]
    train_prompts = {e.prompt for e in task.examples("train", TRAIN_SIZE)}
    held_out = task.examples("eval", EVAL_SIZE)
    assert len(held_out) == EVAL_SIZE and not train_prompts & {e.prompt for e in held_out}
    for example in held_out:
        assert len(set(example.choices)) == len(example.choices) == 4
        assert example.choices[example.answer] == example.completion
    assert len({e.answer for e in held_out}) > 1  # the right choice is not always in one place


def test_the_written_data_trains_and_keeps_its_labels(tiny_llama, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for task in DEMO_TASKS.values():
        paths = write_task_data(task, tmp_path)
        assert load_examples(paths["train"], tokenizer, max_length=256)
        first = paths["eval"].read_text().splitlines()[0]
        assert '"choices"' in first and '"answer"' in first


def test_demo_adapters_are_built_once(tiny_llama, tmp_path):
    config = dataclasses.replace(DEMO_TRAIN_CONFIG, epochs=1, batch_size=32)
    first = build_demo_adapters(tmp_path, tiny_llama, config)
    assert set(first) == set(DEMO_TASKS)
    stamps = {name: (path / "adapter_model.safetensors").stat().st_mtime_ns for name, path in first.items()}
    second = build_demo_adapters(tmp_path, tiny_llama, config)
    assert second == first
    assert stamps == {name: (path / "adapter_model.safetensors").stat().st_mtime_ns for name, path in second.items()}
