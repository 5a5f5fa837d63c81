"""Random Llama checkpoints of real model sizes, written once and reused (benchmarks.verify_sizes, the memory-cap test).

A folder is a complete model: config.json, a byte-level BPE tokenizer trained on the spot
(tests.support.tiny), and seeded random weights in size-capped shards written by
merger.checkpoint's ShardWriter one tensor at a time (never a whole model in memory).  Norm
weights are ones, the rest N(0, std²), with the vocabulary matrices larger so that logits are
peaked and greedy decoding is not decided by float noise.  A folder is built under a temporary
name and renamed when complete, so a half-built one is never reused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from merger.checkpoint import ShardWriter, TensorSpec, plan_shards, shard_name, write_index
from merger.dtypes import SAFETENSORS_NAMES, dtype_name

STAMP = "random_llama.json"
SHARD_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    def config(self, dtype: torch.dtype):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            dtype=dtype_name(dtype),
        )

    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * layer + 2 * self.vocab * self.hidden + self.hidden


SHAPES = {  # Llama-shaped, 32k vocabulary, grouped-query attention
    "0.5B": LlamaShape(hidden=1536, intermediate=4096, layers=16, heads=24, kv_heads=4),
    "1B": LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),  # TinyLlama-1.1B's shape
    "3B": LlamaShape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8),  # Llama-3.2-3B's, 32k vocab
}


def tensor_specs(shape: LlamaShape, dtype: torch.dtype) -> list[TensorSpec]:
    """The checkpoint's tensors, named and shaped by transformers itself (a model on meta)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(shape.config(dtype))
    return [TensorSpec(name, SAFETENSORS_NAMES[dtype], tuple(t.shape)) for name, t in model.state_dict().items()]


def random_tensor(spec: TensorSpec, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if len(spec.shape) == 1:
        return torch.ones(spec.shape, dtype=dtype)
    vocabulary = "embed_tokens" in spec.name or "lm_head" in spec.name
    std = 0.5 if vocabulary else 0.02
    return (torch.randn(spec.shape, generator=gen) * std).to(dtype)


def build(folder: Path, shape: LlamaShape, dtype: torch.dtype) -> Path:
    """The random checkpoint at `folder` (built once; an existing complete one is reused)."""
    from tests.support.tiny import train_tokenizer

    if (folder / STAMP).is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = plan_shards(tensor_specs(shape, dtype), SHARD_BYTES)
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        with ShardWriter(tmp / shard_name(i, len(shards)), shard) as writer:
            for spec in shard:
                writer.write(spec.name, random_tensor(spec, dtype, gen))
    write_index(tmp, shards)
    shape.config(dtype).save_pretrained(tmp)
    train_tokenizer(tmp)
    (tmp / STAMP).write_text(json.dumps({**dataclasses.asdict(shape), "dtype": dtype_name(dtype)}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
