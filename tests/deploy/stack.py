"""Read the deployment files the way Docker Compose, Docker and Grafana read them.

Everything here parses the committed files under the repository root: the compose
file (with compose's `${VAR:-default}` interpolation from `.env.example`), the
Dockerfile's instructions, the Grafana dashboard's PromQL, and the service's
settings, so the tests can check that these pieces name the same things.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HEALTHCHECK_SCRIPT = REPO / "docker" / "healthcheck.py"
ENTRYPOINT_SCRIPT = REPO / "docker" / "entrypoint.sh"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus.yml"
GRAFANA_PROVISIONING = REPO / "docker" / "grafana" / "provisioning"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "d2lora.json"
COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")

SERVICE_NAMES = ("d2lora", "d2lora-gpu")  # the two variants of the API service in the compose file
SETTINGS_PREFIX = "D2LORA_"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME; $$ is a literal $.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(KeyError):
    """A `${NAME:?message}` variable is unset, as compose itself would refuse."""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a compose env file; comments and blank lines skipped."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def referenced_variables(text: str) -> set[str]:
    """Names of every variable the text interpolates (escaped `$$` excluded)."""
    return {m["braced"] or m["plain"] for m in _VARIABLE.finditer(text) if not m["escaped"]}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution in one string value."""

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["braced"] or match["plain"], match["op"] or "", match["arg"] or ""
        value = env.get(name)
        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("?") and missing:
            raise MissingVariable(f"{name}: {arg}")
        return arg if op.endswith("-") and missing else (value or "")

    return _VARIABLE.sub(substitute, text)


def _interpolate_values(node: object, env: dict[str, str]) -> object:
    if isinstance(node, dict):
        return {key: _interpolate_values(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_values(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def load_compose(env: dict[str, str]) -> dict:
    """The compose file as `docker compose config` sees it: YAML first, then each string interpolated."""
    return _interpolate_values(yaml.safe_load(COMPOSE_FILE.read_text()), env)


def settings_env_names() -> set[str]:
    """Every environment variable the service reads: D2LORA_ + a Settings field name."""
    return {SETTINGS_PREFIX + name.upper() for name in Settings.model_fields}


def container_port(mapping: str | int | dict) -> int:
    """The container side of a compose port mapping ("8000:8000", "8000-8003:8000/tcp", 8000, {target: 8000})."""
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).rsplit(":", 1)[-1].split("/")[0])


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "COPY"
    arguments: str  # the rest of the logical line, continuations joined


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Logical lines of a Dockerfile: comments dropped, backslash continuations joined."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comment lines vanish, even inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, arguments = pending.strip().partition(" ")
            logical.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    return logical


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last FROM stage: what the shipped image is made of."""
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    """ENV KEY=value pairs of the given instructions."""
    env = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(ins.arguments))
    return env


def dockerfile_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG NAME=default pairs of the given instructions (an ARG without a default maps to "")."""
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.arguments.partition("=")
            args[name.strip()] = default.strip()
    return args


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression the dashboard sends: panel targets and template-variable queries."""
    exprs = [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs
