"""Which tensors travel in one swap.

The scheduler keeps, per engine, the names of the tensors that differ from the
base (the current model's fused tensors).  Swapping to the next model loads its
fused tensors plus the base's originals for every name the current model changed
and the next one does not, so adapters on different target sets never leak into
each other.  The base's originals are read straight from the base checkpoint's
own safetensors shards: no copy of them is written anywhere.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from merger.checkpoint import CheckpointReader, read_header
from merger.errors import D2LoraError
from service.engines.base import TensorFile


class WeightsError(D2LoraError):
    """A fused tensors file that does not fit the served base."""


def tensor_names(path: Path) -> frozenset[str]:
    """The tensor names in a safetensors file (header only)."""
    header, _ = read_header(Path(path))
    header.pop("__metadata__", None)
    return frozenset(header)


class BaseTensors:
    """Where each tensor of the base checkpoint is stored, and its shape."""

    def __init__(self, base_dir: Path):
        with CheckpointReader(base_dir) as reader:
            self.files: dict[str, Path] = {name: t.file for name, t in reader.tensors.items()}
            self.shapes: dict[str, tuple[int, ...]] = reader.shapes()

    def layer_linear_names(self) -> list[str]:
        """Leaf names of the 2-D weights inside numbered blocks (q_proj, ..., down_proj): what adapters target.

        Embeddings and the LM head sit outside the blocks and are left out.
        """
        names = {
            name.removesuffix(".weight").rpartition(".")[2]
            for name, shape in self.shapes.items()
            if name.endswith(".weight") and len(shape) == 2 and any(p.isdigit() for p in name.split("."))
        }
        return sorted(names)

    def slices(self, names: Iterable[str]) -> list[TensorFile]:
        """The base's original tensors for `names`, one TensorFile per shard."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in sorted(names):
            by_file[self.files[name]].append(name)
        return [TensorFile(path, tuple(names)) for path, names in by_file.items()]


class SwapPlanner:
    def __init__(self, base: BaseTensors):
        self.base = base

    def names_of(self, weights_file: Path | None) -> frozenset[str]:
        """The tensors a model changes; the base model (None) changes none."""
        if weights_file is None:
            return frozenset()
        names = tensor_names(weights_file)
        unknown = sorted(names - self.base.files.keys())
        if unknown:
            raise WeightsError(f"{Path(weights_file).name}: tensor {unknown[0]!r} is not in the base checkpoint")
        return names

    def plan(self, current: frozenset[str], weights_file: Path | None) -> list[TensorFile]:
        """TensorFiles that turn base+current into base+next."""
        following = self.names_of(weights_file)
        files = [TensorFile(Path(weights_file), tuple(sorted(following)))] if weights_file and following else []
        return files + self.base.slices(current - following)
