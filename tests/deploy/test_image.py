"""The CPU image, built from docker/Dockerfile and run with podman: what an operator's first hour does.

No registry is assumed: the base is made from Debian's packages (docker/base-image.sh), and every
wheel comes from a local folder (docker/wheelhouse.sh, then `--build-arg PIP_NO_INDEX=1`), the
air-gapped path.  The container starts with no base configured, so the entrypoint converts the
demo model into its models volume; an adapter is uploaded, its completion checked against
transformers on the merger's merged checkpoint, and a new container on the same volumes must still
serve it.  `make image-test` runs this file (`pytest -m image`); `make test` leaves it out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from merger.demo import build_demo_model
from merger.merge import merge
from service.settings import Settings
from tests.deploy import podman as pm
from tests.support.adapters import write_random_adapter
from tests.support.references import hf_greedy

pytestmark = [pytest.mark.image, pytest.mark.slow]

TAG = "localhost/d2lora-serve:image-test"
ADMIN_TOKEN = "image-test-admin-token"
ADAPTER = "image-adapter"
PROMPTS = ("The capital of France is", "Once upon a time, a small robot")
MAX_TOKENS = 8
CONTAINER_ENV = {"D2LORA_ADMIN_TOKEN": ADMIN_TOKEN, "D2LORA_KV_CACHE_GIB": "1", "D2LORA_MAX_NUM_SEQS": "8"}


@pytest.fixture(scope="module")
def podman() -> pm.Podman:
    found = pm.Podman.find()
    if found is None:
        pytest.skip("podman is not installed (Debian: apt-get install podman runc debootstrap; make image-test does)")
    return found


@pytest.fixture(scope="module")
def base_image(podman) -> str:
    """localhost/d2lora-base:bookworm, made by docker/base-image.sh unless it exists already."""
    if podman.image_exists(pm.BASE_IMAGE):
        return pm.BASE_IMAGE
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip(f"no {pm.BASE_IMAGE}: run docker/base-image.sh as root (needs debootstrap)")
    subprocess.run(["sh", str(pm.BASE_IMAGE_SCRIPT), pm.BASE_IMAGE], check=True, capture_output=True, timeout=1200)
    return pm.BASE_IMAGE


@pytest.fixture(scope="module")
def wheels() -> Path:
    """Every wheel of the CPU image, in the cache (a second run downloads only what is missing)."""
    folder = Settings().cache_dir / "wheels" / "cpu"
    env = os.environ | {"PYTHON": sys.executable}
    done = subprocess.run(
        ["sh", str(pm.WHEELHOUSE_SCRIPT), str(folder), "cpu"], cwd=pm.REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def image(podman, base_image, wheels, tmp_path_factory) -> str:
    build_args = {"PYTHON_IMAGE": base_image, "PIP_NO_INDEX": "1"}
    podman.build(TAG, build_args, {"wheels": wheels}, tmp_path_factory.mktemp("image") / "build.log")
    yield TAG
    podman("rmi", "-f", TAG, check=False)


@pytest.fixture(scope="module")
def volumes(podman):
    made = pm.Volumes(podman)
    yield made
    made.remove()


@pytest.fixture(scope="module")
def adapter_and_references(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """A random D²-LoRA adapter for the demo model, and transformers' greedy answers of the base and the merge."""
    work = tmp_path_factory.mktemp("image-adapter")
    base = build_demo_model(Settings().cache_dir)
    adapter = write_random_adapter(work / "adapter", base, seed=7, scale=0.2)
    merged = work / "merged"
    merge(base, adapter, merged, progress=False)
    return adapter, {base.name: hf_greedy(base, PROMPTS, MAX_TOKENS), ADAPTER: hf_greedy(merged, PROMPTS, MAX_TOKENS)}


def completions(url: str, model: str) -> list[str]:
    answers = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0]["text"])
    return answers


def upload(url: str, adapter: Path) -> httpx.Response:
    files = {name: (adapter / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    return httpx.post(
        f"{url}/adapters",
        data={"name": ADAPTER},
        files={"config": files["adapter_config.json"], "weights": files["adapter_model.safetensors"]},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=600,
    )


@pytest.fixture(scope="module")
def first_run(podman, image, volumes, adapter_and_references) -> dict:
    """What the first container did: healthcheck, user, upload status, answers per model."""
    adapter, references = adapter_and_references
    with pm.container(podman, image, volumes, CONTAINER_ENV) as running:
        seen = {
            "healthcheck": podman("healthcheck", "run", running.name, check=False).returncode,
            "uid": running.exec("id", "-u").stdout.strip(),
            "models before": [m["id"] for m in httpx.get(f"{running.url}/v1/models").json()["data"]],
            "upload": upload(running.url, adapter),
        }
        seen["answers"] = {model: completions(running.url, model) for model in references}
    return seen


def test_the_container_is_healthy_once_ready_and_runs_as_its_own_user(first_run):
    assert first_run["healthcheck"] == 0
    assert first_run["uid"] == "10001"


def test_the_entrypoint_serves_the_demo_model_when_no_base_is_given(first_run, adapter_and_references):
    base_name = next(name for name in adapter_and_references[1] if name != ADAPTER)
    assert first_run["models before"] == [base_name]


def test_an_uploaded_adapter_is_merged_verified_and_ready(first_run):
    response = first_run["upload"]
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "ready"


def test_completions_equal_transformers_on_the_merged_checkpoint(first_run, adapter_and_references):
    references = adapter_and_references[1]
    assert first_run["answers"] == references
    assert len(set(map(tuple, references.values()))) == 2, "the adapter must change the answers to be a test"


def test_a_new_container_on_the_same_volumes_still_serves_the_adapter(
    podman, image, volumes, first_run, adapter_and_references
):
    references = adapter_and_references[1]
    with pm.container(podman, image, volumes, CONTAINER_ENV) as running:
        record = httpx.get(f"{running.url}/adapters/{ADAPTER}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert record.status_code == 200 and record.json()["status"] == "ready", record.text
        assert completions(running.url, ADAPTER) == references[ADAPTER]
