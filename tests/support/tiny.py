"""Tiny random Llama / Qwen2 / GPT-2 checkpoints with a tokenizer trained on the spot.

No hub access: the tokenizer is a byte-level BPE trained by `tokenizers` on a
fixed corpus, the weights are seeded random.  `init_std` is large enough that
logits are peaked, so greedy decoding is not decided by float noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Convert to upper case: hello world -> HELLO WORLD.",
    "Question: what is two plus two? Answer: four.",
    "A quick brown fox jumps over the lazy dog 0123456789.",
] * 50
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
VOCAB_SIZE = 384


def train_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _config(arch: str, vocab: int, eos: int):
    common = {"vocab_size": vocab, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=256, initializer_range=0.2, **common)
    llama_like = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        **common,
    )
    return Qwen2Config(**llama_like) if arch == "qwen2" else LlamaConfig(**llama_like)


MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel}
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
}


def make_tiny_checkpoint(
    out_dir: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB", seed: int = 0
) -> Path:
    """Write a tiny random model + tokenizer to out_dir (max_shard_size '100KB' gives several shards)."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = MODEL_CLASSES[arch](_config(arch, len(tokenizer), tokenizer.eos_token_id)).to(dtype)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir
