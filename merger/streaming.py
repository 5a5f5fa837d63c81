"""A transformers causal LM run layer by layer from its checkpoint, several models in lock-step.

A `StreamedModel` is a transformers model built on the meta device (buffers such as the rotary
frequencies are real) whose parameters are checkpoint tensors only while the module owning them
runs: a forward pre-hook maps them in (`TensorPool`, zero-copy where the dtype matches), a
forward hook puts the meta parameters back and gives the pages back.  The forward is the
model's own, in three parts:

    capture    the model runs up to its decoder stack, which records what each layer is called
               with (masks, rotary embeddings, the KV cache) and stops the forward
    run_layer  one real decoder layer on a model's hidden states, with those inputs
    logits     the model runs again with its stack bypassed, so its own final norm and head turn
               the last hidden states into logits

`lockstep_layers` steps several models (the unmerged reference, the merged model) through the
layers together: a layer's tensors are mapped while the models run it (a streamed module's only
while it multiplies), and unmapped before the next layer.  The weights are read the way they are
used (merger.streamed_modules): the embedding a row at a time, the head and every Linear of the
layers, adapted ones run unmerged included, a block of rows at a time.  Peak memory: one block of
weights (the whole tensors of a module that has no streamed form: norms, a transposed Conv1D run
unmerged) plus the activations, whatever the model's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from merger import attention
from merger.artifact import Adapter
from merger.checkpoint import StoredTensor
from merger.errors import D2LoraError
from merger.memory import give_back_free_memory
from merger.streamed_modules import (
    StreamedEmbedding,
    StreamedLinear,
    StreamedUnmergedLinear,
    StreamedWeights,
    TensorPool,
)
from merger.unmerged import UnmergedLinear, apply_unmerged

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What the model called one decoder layer with, its hidden states left out."""

    args: tuple
    kwargs: dict


@dataclasses.dataclass(frozen=True)
class Captured:
    hidden: torch.Tensor  # (batch, seq, hidden): the first layer's input
    layers: list[LayerInputs]
    cache: object | None  # the transformers Cache the layers update, when use_cache


class StreamError(D2LoraError):
    """The checkpoint cannot be streamed through its transformers model (missing tensors, other shapes)."""


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer during `capture`: records its inputs; the last one stops the forward."""

    def __init__(self, records: list[tuple[tuple, dict]], last: bool):
        super().__init__()
        self.records, self.last = records, last

    def forward(self, hidden, *args, **kwargs):
        self.records.append(((hidden, *args), kwargs))
        if self.last:
            raise _StopForward
        return hidden


class _Bypass(nn.Module):
    """Stands in for a decoder layer during `logits`: passes its input on; the last one returns `output`."""

    def __init__(self, output: torch.Tensor | None):
        super().__init__()
        self.output = output

    def forward(self, hidden, *args, **kwargs):
        return hidden if self.output is None else self.output


def skeleton(config_dir: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The checkpoint's transformers model with every parameter on meta, in `dtype`, in eval mode.

    Built on the meta device (no memory, no address space), then its non-persistent buffers (the rotary
    frequencies) are made real and initialised by the model's own _init_weights, as from_pretrained does.
    Its attention is transformers' SDPA with the key/value heads shared in the kernel (merger.attention).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise StreamError(f"{config_dir}: no causal LM to build from its config.json ({err})") from None
    owners: dict[int, nn.Module] = {}
    for name, buffer in model.named_non_persistent_buffers():
        path, _, attribute = name.rpartition(".")
        owner = model.get_submodule(path)
        owner._buffers[attribute] = torch.empty_like(buffer, device="cpu")
        owners[id(owner)] = owner
    for owner in owners.values():
        model._init_weights(owner)
    attention.use_shared_kv_sdpa(model)
    meta = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if meta:
        raise StreamError(f"{type(model).__name__}: buffer {meta[0]!r} is not one streaming can initialise")
    return model.eval()


def decoder_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers (the classes transformers never splits across devices)."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(type(m).__name__ in layer_classes for m in module):
            return path, module
    raise StreamError(f"{type(model).__name__}: no stack of decoder layers found")


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Tied parameter names, both ways (lm_head.weight <-> model.embed_tokens.weight when the model ties them)."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return {**{source: target for target, source in tied.items()}, **tied}


def checkpoint_key(model: nn.Module, name: str, tensors: Mapping[str, StoredTensor]) -> str:
    """The checkpoint's name for a model parameter: itself, without the base-model prefix, or what it is tied to."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    tied = _tied_names(model).get(name)
    candidates = [c for c in (name, tied) if c]
    candidates += [c.removeprefix(prefix) for c in candidates if c.startswith(prefix)]
    for candidate in candidates:
        if candidate in tensors:
            return candidate
    raise StreamError(f"the checkpoint has no tensor for {name!r}")


@dataclasses.dataclass(frozen=True)
class Binding:
    """One parameter of the skeleton and the stored tensor that becomes it."""

    name: str  # the parameter's name on its module, e.g. "weight"
    key: str  # the checkpoint's name
    stored: StoredTensor
    meta: nn.Parameter  # put back after the module ran


class StreamedModel:
    """A transformers causal LM whose parameters are `tensors` (a checkpoint's, or the base's with fused ones).

    `adapter`: run it unmerged (merger.unmerged, the scale recomputed from each materialised weight).
    """

    def __init__(
        self,
        config_dir: Path,
        tensors: Mapping[str, StoredTensor],
        dtype: torch.dtype,
        pool: TensorPool,
        adapter: Adapter | None = None,
    ):
        self.dtype, self.pool, self.tensors = dtype, pool, tensors
        self.model = skeleton(config_dir, dtype)
        if adapter is not None:
            shapes = {name: t.spec.shape for name, t in tensors.items()}
            apply_unmerged(self.model, adapter, recompute_scale=True, base_shapes=shapes)
        self.stack_path, self.layers = decoder_stack(self.model)
        self._stream_vocabulary()
        self.bindings = {module: self._bind(path, module) for path, module in self.model.named_modules()}
        self.bindings = {module: b for module, b in self.bindings.items() if b}
        for module in self.bindings:
            module.register_forward_pre_hook(self._materialise)
            module.register_forward_hook(self._release, always_call=True)

    # parameters

    def _stored(self, name: str, shape: tuple[int, ...]) -> tuple[str, StoredTensor]:
        key = checkpoint_key(self.model, name, self.tensors)
        stored = self.tensors[key]
        if stored.spec.shape != shape:
            raise StreamError(f"{key}: the checkpoint holds shape {list(stored.spec.shape)}, the model {list(shape)}")
        return key, stored

    def _bind(self, path: str, module: nn.Module) -> list[Binding]:
        bindings = []
        for name, param in module._parameters.items():
            if param is not None:
                key, stored = self._stored(f"{path}.{name}" if path else name, tuple(param.shape))
                bindings.append(Binding(name, key, stored, param))
        return bindings

    def _stream_vocabulary(self) -> None:
        """Replace a plain nn.Embedding input, every plain nn.Linear (the head, the layers' projections) and
        every adapted Linear run unmerged by their row-wise streamed forms."""
        embedding = self.model.get_input_embeddings()
        if type(embedding) is nn.Embedding:
            path = next(p for p, m in self.model.named_modules() if m is embedding)
            _, weight = self._stored(f"{path}.weight", tuple(embedding.weight.shape))
            self.model.set_input_embeddings(StreamedEmbedding(self.pool, weight, embedding.weight.dtype))
        for path, module in list(self.model.named_modules()):
            streamed = self._streamed_form(path, module)
            if streamed is not None:
                parent, _, name = path.rpartition(".")
                setattr(self.model.get_submodule(parent), name, streamed)

    def _streamed_form(self, path: str, module: nn.Module) -> StreamedWeights | None:
        """The streamed module standing in for a plain Linear or an (out, in) unmerged one, else None."""
        if type(module) is nn.Linear:
            weight, bias = self._weight_and_bias(path, module.weight, module.bias)
            return StreamedLinear(self.pool, weight, bias, module.weight.dtype)
        if isinstance(module, UnmergedLinear) and not module.fan_in_fan_out:
            weight, bias = self._weight_and_bias(path, module.weight, module.bias)
            return StreamedUnmergedLinear(self.pool, module, weight, bias)
        return None

    def _weight_and_bias(
        self, path: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[StoredTensor, StoredTensor | None]:
        stored_bias = None if bias is None else self._stored(f"{path}.bias", tuple(bias.shape))[1]
        return self._stored(f"{path}.weight", tuple(weight.shape))[1], stored_bias

    def _materialise(self, module: nn.Module, args: tuple) -> None:
        for b in self.bindings[module]:
            module._parameters[b.name] = nn.Parameter(self.pool.tensor(b.stored, b.meta.dtype), requires_grad=False)

    def _release(self, module: nn.Module, args: tuple, output: object) -> None:
        for b in self.bindings[module]:
            module._parameters[b.name] = b.meta
            self.pool.release(b.stored)

    def layer_keys(self, index: int) -> list[str]:
        """The checkpoint names layer `index` reads."""
        modules = list(self.layers[index].modules())
        streamed = [key for m in modules if isinstance(m, StreamedWeights) for key in m.keys]
        return [b.key for m in modules for b in self.bindings.get(m, ())] + streamed

    # the forward, in three parts

    def capture(self, **forward_kwargs) -> Captured:
        """Run the model up to its decoder stack; what each layer would be called with."""
        records: list[tuple[tuple, dict]] = []
        count = len(self.layers)
        recorders = [_Recorder(records, i == count - 1) for i in range(count)]
        with _replaced_layers(self.layers, recorders), contextlib.suppress(_StopForward):  # the last one stops it
            self.model(**forward_kwargs)
        self.pool.close()
        if len(records) != count:
            raise StreamError(f"{type(self.model).__name__}: the forward called {len(records)} of {count} layers")
        layers = [LayerInputs(args[1:], kwargs) for args, kwargs in records]
        return Captured(records[0][0][0], layers, _find_cache(records[0]))

    def run_layer(self, index: int, hidden: torch.Tensor, captured: Captured) -> torch.Tensor:
        inputs = captured.layers[index]
        out = self.layers[index](hidden, *inputs.args, **inputs.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of last hidden states (the model's own norm and head).  (positions, hidden) -> (positions, V)

        The model runs on dummy tokens with its decoder stack bypassed: the last layer returns `hidden`.
        """
        positions = hidden.shape[0]
        dummy = torch.zeros(1, positions, dtype=torch.long)  # the stack is bypassed: only the shape matters
        bypass = [_Bypass(None) for _ in range(len(self.layers) - 1)] + [_Bypass(hidden[None])]
        with _replaced_layers(self.layers, bypass):
            out = self.model(
                input_ids=dummy, attention_mask=torch.ones_like(dummy), position_ids=dummy, use_cache=False
            )
        self.pool.close()
        return out.logits[0].float()


class _replaced_layers:
    """Swap the modules of a ModuleList for others, and back."""

    def __init__(self, layers: nn.ModuleList, stand_ins: Sequence[nn.Module]):
        self.layers, self.stand_ins, self.originals = layers, stand_ins, list(layers)

    def __enter__(self) -> None:
        for i, module in enumerate(self.stand_ins):
            self.layers[i] = module

    def __exit__(self, *exc: object) -> None:
        for i, module in enumerate(self.originals):
            self.layers[i] = module


def _find_cache(record: tuple[tuple, dict]) -> object | None:
    from transformers.cache_utils import Cache

    args, kwargs = record
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)


def lockstep_layers(
    models: Sequence[StreamedModel],
    captured: Sequence[Captured],
    after_layer: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Every model through every decoder layer, a layer at a time; their last hidden states.

    after_layer(i) runs while layer i's tensors are still mapped (the weight checks read them there).
    """
    counts = {len(m.layers) for m in models}
    if len(counts) != 1:
        raise StreamError(f"models with different numbers of layers cannot run together: {sorted(counts)}")
    hidden = [c.hidden for c in captured]
    pool = models[0].pool
    for index in range(counts.pop()):
        hidden = [m.run_layer(index, h, c) for m, h, c in zip(models, hidden, captured, strict=True)]
        if after_layer is not None:
            after_layer(index)
        pool.close()
        give_back_free_memory()  # a KV cache grows by concatenation: its old copies fragment the heap
    return hidden
