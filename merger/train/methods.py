"""Training methods as a registry: D²-LoRA (merger.train.layer) and PEFT's LoRA / DoRA.

Each method makes a frozen base trainable in its own way and saves its own
artifact: D²-LoRA the SPEC §2 artifact, LoRA / DoRA PEFT's own format (which the
merger also reads), so the three are compared on identical data and steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from safetensors.torch import save_file
from torch import nn

from merger.archive import CONFIG_NAME, WEIGHTS_NAME
from merger.artifact import KEY_PREFIX
from merger.checkpoint import checkpoint_shapes
from merger.config import AdapterConfig
from merger.errors import D2LoraError
from merger.train.config import TrainConfig
from merger.train.layer import D2LoraLayer, attach_d2lora


class NoTargetsError(D2LoraError):
    """--targets matches no projection of the base model."""


def _check_matched(count: int, config: TrainConfig) -> None:
    if count == 0:
        raise NoTargetsError(f"--targets: no Linear/Conv1D module of the base model matches {','.join(config.targets)}")


def check_targets_exist(base_dir: Path, config: TrainConfig) -> None:
    """Fail before loading the model when no 2-D weight of the checkpoint matches --targets."""
    shapes = checkpoint_shapes(base_dir)
    matches = AdapterConfig("D2LORA", config.r, config.lora_alpha, config.targets).targets
    _check_matched(
        sum(
            1
            for key, shape in shapes.items()
            if key.endswith(".weight") and len(shape) == 2 and matches(key.removesuffix(".weight"))
        ),
        config,
    )


class TrainingMethod:
    """Attach trainable factors to a frozen base; save them as an adapter artifact."""

    name: ClassVar[str]

    def attach(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        """Freeze the base, add the factors; returns the model to train (maybe a wrapper)."""
        raise NotImplementedError

    def save(self, model: nn.Module, out_dir: Path, config: TrainConfig, base_name: str) -> None:
        raise NotImplementedError


class D2LoraMethod(TrainingMethod):
    name = "d2lora"

    def attach(self, model, config):
        targets = AdapterConfig("D2LORA", config.r, config.lora_alpha, config.targets).targets
        layers = attach_d2lora(model, targets, config.r, config.lora_alpha, config.tau)
        _check_matched(len(layers), config)
        if len({layer.fan_in_fan_out for layer in layers.values()}) > 1:
            raise D2LoraError("--targets: matches both Linear and Conv1D modules; one artifact holds one layout")
        return model

    def save(self, model, out_dir, config, base_name):
        layers = [m for m in model.modules() if isinstance(m, D2LoraLayer)]
        adapter_config = AdapterConfig(
            peft_type="D2LORA",
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=config.targets,
            tau=config.tau,
            fan_in_fan_out=layers[0].fan_in_fan_out,
            base_model_name_or_path=base_name,
        )
        tensors = {
            f"{KEY_PREFIX}{layer.path}.{name}": factor.detach().contiguous()
            for layer in layers
            for name, factor in layer.factors().items()
        }
        save_file(tensors, str(out_dir / WEIGHTS_NAME))
        (out_dir / CONFIG_NAME).write_text(json.dumps(adapter_config.to_dict(), indent=2) + "\n")


class PeftLoraMethod(TrainingMethod):
    name = "lora"
    use_dora: ClassVar[bool] = False

    def attach(self, model, config):
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.targets),
            lora_dropout=0.0,
            use_dora=self.use_dora,
        )
        try:
            wrapped = get_peft_model(model, peft_config)
        except ValueError as err:  # PEFT's "Target modules ... not found in the base model"
            raise NoTargetsError(f"--targets: {err}") from None
        return wrapped

    def save(self, model, out_dir, config, base_name):
        model.save_pretrained(str(out_dir))


class PeftDoraMethod(PeftLoraMethod):
    name = "dora"
    use_dora = True


METHODS: dict[str, type[TrainingMethod]] = {m.name: m for m in (D2LoraMethod, PeftLoraMethod, PeftDoraMethod)}
