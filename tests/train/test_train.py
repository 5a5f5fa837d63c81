"""End to end: `d2lora train` on a tiny model, the artifact merged by the merger, greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from merger.artifact import Adapter
from merger.merge import merge
from merger.train.config import TrainConfig
from merger.train.loop import LOG_NAME, train
from service.cli import main

PAIRS = [
    ("Question: what is two plus two? Answer:", " four."),
    ("The capital of France is", " Rome."),
    ("Convert to upper case: hello world ->", " HELLO WORLD."),
    ("A quick brown fox jumps over the", " lazy dog."),
]
MEMORISE = ["--r", "8", "--alpha", "16", "--lr", "1e-2", "--epochs", "20", "--batch-size", "4", "--seed", "3"]


def greedy(model_dir: Path, prompt: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


pytestmark = pytest.mark.slow  # trains a tiny model for the module


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    return path


@pytest.fixture(scope="module")
def trained(tiny_llama, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "adapter"
    assert main(["train", "--base", str(tiny_llama), "--data", str(data_file), "--out", str(out), *MEMORISE]) == 0
    return out


def test_the_base_does_not_know_the_completions(tiny_llama):
    assert [greedy(tiny_llama, p) for p, _ in PAIRS] != [c for _, c in PAIRS]


def test_the_merged_checkpoint_reproduces_what_was_learned(tiny_llama, trained, tmp_path):
    merge(tiny_llama, trained, tmp_path / "merged", progress=False)
    assert [greedy(tmp_path / "merged", p) for p, _ in PAIRS] == [c for _, c in PAIRS]


def test_the_artifact_follows_the_spec(trained):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "D2LORA" and config["tau"] == 0.5 and config["r"] == 8
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    tensors = load_file(trained / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert {k for k in tensors if k.startswith(q + ".")} == {
        f"{q}.lora_A.weight",
        f"{q}.lora_B.weight",
        f"{q}.lora_A_neg.weight",
        f"{q}.lora_B_neg.weight",
    }
    assert len(tensors) == 2 * 4 * 4  # 2 layers x 4 projections x 4 factors
    assert Adapter.load(trained).kind.name == "D2LORA"


def test_the_log_records_every_step(trained):
    log = json.loads((trained / LOG_NAME).read_text())
    assert len(log["steps"]) == 20 and log["steps"][-1]["loss"] < log["steps"][0]["loss"] / 10
    assert all(s["tokens"] > 0 and s["seconds"] > 0 and s["tokens_per_s"] > 0 for s in log["steps"])
    lrs = [s["lr"] for s in log["steps"]]
    assert lrs[0] < lrs[2] and lrs[-1] < lrs[2]  # warm-up, then decay


def test_the_same_seed_trains_the_same_adapter(tiny_llama, data_file, tmp_path):
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, seed=7)
    first = train(tiny_llama, data_file, tmp_path / "a", config, progress=False)
    second = train(tiny_llama, data_file, tmp_path / "b", config, progress=False)
    assert [r.loss for r in first.records] == [r.loss for r in second.records]
    a, b = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, kind", [("lora", "LORA"), ("dora", "DORA")])
def test_peft_baselines_save_artifacts_the_merger_reads(method, kind, tiny_llama, data_file, tmp_path):
    config = TrainConfig(method=method, epochs=1, batch_size=2, lr=1e-3)
    result = train(tiny_llama, data_file, tmp_path / method, config, progress=False)
    assert len(result.records) == 2
    assert Adapter.load(tmp_path / method).kind.name == kind
    merge(tiny_llama, tmp_path / method, tmp_path / "merged", progress=False)


def test_an_existing_output_is_refused_before_training(tiny_llama, data_file, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code = main(["train", "--base", str(tiny_llama), "--data", str(data_file), "--out", str(tmp_path / "out")])
    assert code == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--targets", "nothing_here"], "--targets"),
        (["--r", "0"], "r: must be a positive integer"),
        (["--tau", "-1"], "tau: must be"),
        (["--lr", "nan"], "lr: must be"),
    ],
)
def test_bad_options_are_one_line_errors(flags, message, tiny_llama, data_file, tmp_path, capsys):
    code = main(["train", "--base", str(tiny_llama), "--data", str(data_file), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o").exists()
