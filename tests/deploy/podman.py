"""The image built and run with podman, as `make image-test` needs it on a host without a registry.

Everything goes through the podman CLI.  Two host quirks are handled here and
only here: podman's default runtime (crun) fails on some hosts' cgroups, so
runc is used whenever it is installed, and runc cannot set rlimits it is not
given, so every build and run passes explicit `--ulimit`s.  Containers run on
the host's network (no bridge or port mapping is assumed to work), so each one
listens on a free loopback port of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.deploy.stack import DOCKERFILE, REPO
from tests.support.live import free_port

BASE_IMAGE = "localhost/d2lora-base:bookworm"
BASE_IMAGE_SCRIPT = REPO / "docker" / "base-image.sh"
WHEELHOUSE_SCRIPT = REPO / "docker" / "wheelhouse.sh"
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1024:1024")
BUILD_TIMEOUT_S = 45 * 60
READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30


class PodmanError(RuntimeError):
    """A podman command failed; the message ends with its output."""


@dataclass(frozen=True)
class Podman:
    binary: str
    runtime: str | None  # None: podman's configured default

    @classmethod
    def find(cls) -> Podman | None:
        binary = shutil.which("podman")
        if binary is None:
            return None
        return cls(binary, os.environ.get("PODMAN_RUNTIME") or shutil.which("runc"))

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        command = [self.binary, *(["--runtime", self.runtime] if self.runtime else []), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise PodmanError(f"`{' '.join(command)}` exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
        return done

    def image_exists(self, tag: str) -> bool:
        return self("image", "exists", tag, check=False).returncode == 0

    def build(self, tag: str, build_args: dict[str, str], contexts: dict[str, Path], log: Path) -> None:
        """docker/Dockerfile from the repository root; `--format docker` keeps the HEALTHCHECK, and with
        `--layers=false` no intermediate stage image is left behind."""
        args = [f"--build-arg={name}={value}" for name, value in build_args.items()]
        args += [f"--build-context={name}={path}" for name, path in contexts.items()]
        command = ["build", "--format", "docker", "--layers=false", *ULIMITS, *args, "-f", str(DOCKERFILE), "-t", tag]
        done = self(*command, str(REPO), timeout=BUILD_TIMEOUT_S, check=False)
        log.write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise PodmanError(f"podman build exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")


@dataclass
class Container:
    """One running container of the image; `url` answers once /ready does."""

    podman: Podman
    name: str
    url: str

    def logs(self) -> str:
        done = self.podman("logs", self.name, check=False)
        return (done.stdout + done.stderr)[-4000:]

    def running(self) -> bool:
        done = self.podman("inspect", "--format", "{{json .State}}", self.name, check=False)
        return done.returncode == 0 and json.loads(done.stdout)["Running"]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running():
                raise PodmanError(f"container {self.name} stopped before /ready:\n{self.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(1)
        raise PodmanError(f"{self.url}/ready did not answer within {READY_TIMEOUT_S} s:\n{self.logs()}")

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return self.podman("exec", self.name, *command, check=False, timeout=60)


@dataclass
class Volumes:
    """Named volumes for /data and /models, made fresh and removed at the end (what compose's volumes are)."""

    podman: Podman
    prefix: str = field(default_factory=lambda: f"d2lora-image-test-{uuid.uuid4().hex[:8]}")

    @property
    def mounts(self) -> list[str]:
        return ["-v", f"{self.prefix}-data:/data", "-v", f"{self.prefix}-models:/models"]

    def remove(self) -> None:
        for volume in ("data", "models"):
            self.podman("volume", "rm", "-f", f"{self.prefix}-{volume}", check=False)


@contextlib.contextmanager
def container(podman: Podman, image: str, volumes: Volumes, env: dict[str, str]) -> Iterator[Container]:
    """`podman run` the image on a free host port; yields once /ready answers; stopped and removed after."""
    port = free_port()
    name = f"{volumes.prefix}-{uuid.uuid4().hex[:6]}"
    env_args = [f"--env={key}={value}" for key, value in (env | {"D2LORA_PORT": str(port)}).items()]
    podman("run", "-d", "--name", name, "--network", "host", *ULIMITS, *volumes.mounts, *env_args, image)
    running = Container(podman, name, f"http://127.0.0.1:{port}")
    try:
        running.wait_ready()
        yield running
    finally:
        podman("stop", "-t", str(STOP_TIMEOUT_S), name, check=False, timeout=STOP_TIMEOUT_S + 30)
        podman("rm", "-f", name, check=False)
