"""An upload for a model that cannot be loaded whole within the memory it is given still fuses and verifies.

The worker stages (service.merging: fuse, verify) run in a child process whose address space is capped
(RLIMIT_AS) below the size of the checkpoint.  Measured here: torch + transformers alone map ~1.34 GiB
(VmPeak after import); the streamed stages on this 2.43 GB (2.26 GiB) checkpoint peak at ~1.70 GiB.  The
cap sits between those and the checkpoint, ~300 MiB above the peak (thread stacks, allocator arenas and
library mappings differ between machines), and the same cap stops transformers' own whole-model load.
MALLOC_ARENA_MAX and TOKENIZERS_PARALLELISM keep idle threads from reserving address space they never use.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.adapters import write_random_adapter
from tests.support.capped import run_capped
from tests.support.random_llama import LlamaShape, build

SHAPE = LlamaShape(hidden=1024, intermediate=2816, layers=48, heads=16, kv_heads=4)  # 607M parameters
CAP_BYTES = 2 * 2**30
CHILD_ENV = {"MALLOC_ARENA_MAX": "2", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big_base(tmp_path_factory):
    return build(tmp_path_factory.mktemp("capped") / "llama-607m", SHAPE, torch.float32)


def test_the_checkpoint_is_larger_than_the_cap_and_a_whole_load_fails_under_it(big_base):
    checkpoint_bytes = sum(p.stat().st_size for p in big_base.glob("*.safetensors"))
    assert checkpoint_bytes > CAP_BYTES
    whole = run_capped(CAP_BYTES, "tests.support.capped:load_whole", {"base": str(big_base)}, **CHILD_ENV)
    assert whole.returncode != 0 and ("memory" in whole.stderr.lower() or "mmap" in whole.stderr.lower()), whole.stderr


def test_an_upload_is_fused_and_verified_under_the_cap(big_base, tmp_path):
    artifact = write_random_adapter(tmp_path / "adapter", big_base, r=8, alpha=16, seed=1, relative_size=0.05)
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    kwargs = {"base": str(big_base), "artifact": str(artifact), "work_dir": str(work_dir)}
    run = run_capped(CAP_BYTES, "tests.support.capped:upload_stages", kwargs, **CHILD_ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    assert isinstance(run.result, dict) and run.result["passed"] is True, run.result
    assert run.result["logits"]["greedy_agreement"] == 1.0 and len(run.result["weight_errors"]) == 4 * SHAPE.layers
    assert run.vm_peak_bytes < CAP_BYTES
    assert sorted(p.name for p in work_dir.iterdir()) == ["form", "fused.safetensors"]
