"""Reference answers: what transformers itself generates on a checkpoint (the merger's output or the base)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def hf_greedy(model_dir: Path, prompts: tuple[str, ...], max_tokens: int) -> list[str]:
    """transformers' own greedy completion of each prompt, fp32."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, t)
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)  # (1, t + new)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers
