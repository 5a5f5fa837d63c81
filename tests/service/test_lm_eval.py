"""lm-evaluation-harness through the live server (`local-completions`, tokens and text) equals lm-eval's own `hf`
model on the merger's merged checkpoint of the same adapter: per-choice log-likelihoods, accuracy, generations.

The tasks are local (JSON data files, no hub): a multiple-choice task scored by log-likelihood (what the paper's
QA evaluation does) and a generate_until task.
"""

from __future__ import annotations

import pytest

from merger.train.tasks import DEMO_TASKS
from tests.service.conftest import PROMPTS
from tests.support.harness import (
    evaluate,
    served,
    transformers_model,
    write_generation_task,
    write_multiple_choice_task,
)
from tests.support.live import API_KEY

pytestmark = pytest.mark.slow  # lm-eval runs a few hundred requests
ADAPTER = "qkvo"
TASKS = ["d2lora_mc", "d2lora_gen"]
MC_DOCS = 8


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    examples = DEMO_TASKS["date-iso"].examples("eval", MC_DOCS)
    docs = [{"context": f"{e.prompt}\nAnswer:", "choices": list(e.choices), "answer": e.answer} for e in examples]
    write_multiple_choice_task(folder, TASKS[0], docs)
    generations = [{"context": prompt, "target": ""} for prompt in (*PROMPTS, "Question: what is two plus two?")]
    write_generation_task(folder, TASKS[1], generations, until=["\n"], max_gen_toks=12)
    return folder


@pytest.fixture(scope="module")
def reference(task_dir, adapters):
    """lm-eval's `hf` model on the merged checkpoint of ADAPTER, fp32."""
    return evaluate(transformers_model(adapters[ADAPTER].merged), task_dir, TASKS)


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_local_completions_equals_hf_on_the_merged_checkpoint(
    live_server, uploaded, demo_dir, task_dir, reference, tokenized, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    results = evaluate(served(live_server.url, ADAPTER, demo_dir, tokenized, batch_size=4), task_dir, TASKS)
    choices, expected = results[TASKS[0]], reference[TASKS[0]]
    assert [d.doc_id for d in choices] == list(range(MC_DOCS))
    for doc, ref in zip(choices, expected, strict=True):
        assert doc.loglikelihoods == pytest.approx(ref.loglikelihoods, abs=1e-3)
    assert [d.correct for d in choices] == [d.correct for d in expected]
    assert [d.generation for d in results[TASKS[1]]] == [d.generation for d in reference[TASKS[1]]]
    assert all(d.generation for d in results[TASKS[1]])  # the adapter said something: the comparison is not empty
