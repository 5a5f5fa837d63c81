"""Training data: loss masks, and every kind of bad file named with its line number on the CLI."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from merger.train.data import IGNORE_INDEX, load_examples
from service.cli import main

GOOD = b'{"prompt": "Question: what is two plus two? Answer:", "completion": " four."}\n'
TOO_LONG_LINE = b'{"prompt": "' + b"a" * (1 << 20) + b'", "completion": " b"}\n'

BAD_FILES = {
    "missing completion": (GOOD + b'{"prompt": "hello"}\n', "line 2", '"completion"'),
    "empty file": (b"", "", "no examples"),
    "only blank lines": (b"\n  \n\n", "", "no examples"),
    "over-long line": (GOOD + TOO_LONG_LINE, "line 2", "over the limit"),
    "not UTF-8": (GOOD + GOOD + b'{"prompt": "caf\xe9", "completion": " b"}\n', "line 3", "UTF-8"),
    "bad JSON": (GOOD + b"\n" + b'{"prompt": "a", "completion": \n', "line 3", "not valid JSON"),
    "not an object": (b'["prompt", "completion"]\n', "line 1", "JSON object"),
    "empty completion": (b'{"prompt": "a", "completion": ""}\n', "line 1", "empty"),
    "last message not assistant": (
        b'{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}\n',
        "line 1",
        "assistant",
    ),
    "message without content": (
        b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}\n',
        "line 1",
        "messages[0]",
    ),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_is_one_line_with_the_line_number(case, tiny_llama, tmp_path, capsys):
    content, where, reason = BAD_FILES[case]
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    code = main(["train", "--base", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("d2lora train: error:")
    assert f"data.jsonl {where}" in err and reason in err
    assert not (tmp_path / "out").exists()


def test_an_example_over_max_length_names_its_line(tiny_llama, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(GOOD * 2 + b'{"prompt": "' + b"the capital of France " * 20 + b'", "completion": " Paris"}\n')
    code = main(
        ["train", "--base", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "out"), "--max-length", "32"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "line 3" in err and "--max-length 32" in err


def test_a_missing_file_is_a_clear_error(tiny_llama, tmp_path, capsys):
    code = main(
        ["train", "--base", str(tiny_llama), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "cannot read" in capsys.readouterr().err


def test_loss_is_only_on_the_completion_and_its_eos(tokenizer, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(GOOD)
    [example] = load_examples(data, tokenizer, max_length=64)
    prompt_len = len(tokenizer("Question: what is two plus two? Answer:")["input_ids"])
    assert example.labels[:prompt_len] == (IGNORE_INDEX,) * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert tokenizer.decode(example.labels[prompt_len:]) == " four.<|endoftext|>"


def test_chat_examples_learn_only_the_assistant_turn(tokenizer, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "two plus two?"},'
        ' {"role": "assistant", "content": "four"}], "answer": 0}\n'
    )
    [example] = load_examples(data, tokenizer, max_length=64)
    learned = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "four<|end|>"
    assert tokenizer.decode(example.input_ids).startswith("<|user|>two plus two?<|end|><|assistant|>")
