"""docker-compose.yml: valid Compose, and naming only files, ports and settings that exist.

The schema is the Compose Specification's own JSON schema, vendored as
tests/deploy/compose-spec.json from compose-spec/compose-spec (schema/compose-spec.json
at commit 170098ba07d9, Apache-2.0); no Docker engine is needed.
"""

from __future__ import annotations

import json
import subprocess

import jsonschema
import pytest

from tests.deploy.stack import (
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    DOCKERFILE,
    ENV_EXAMPLE,
    REPO,
    SERVICE_NAMES,
    SETTINGS_PREFIX,
    MissingVariable,
    dockerfile_env,
    dockerfile_instructions,
    final_stage,
    load_compose,
    read_env_file,
    referenced_variables,
    settings_env_names,
)

SECRETS = ("D2LORA_ADMIN_TOKEN", "D2LORA_API_KEYS", "GRAFANA_ADMIN_PASSWORD")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """.env.example with the secrets filled in, as a user's .env would be."""
    return read_env_file(ENV_EXAMPLE) | {"D2LORA_ADMIN_TOKEN": "admin-secret", "GRAFANA_ADMIN_PASSWORD": "pw"}


@pytest.fixture(scope="module")
def compose(env) -> dict:
    return load_compose(env)


@pytest.fixture(scope="module")
def api_services(compose) -> dict[str, dict]:
    return {name: compose["services"][name] for name in SERVICE_NAMES}


def test_compose_file_is_valid_against_the_compose_specification(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_refuses_to_start_without_the_secrets():
    unset = read_env_file(ENV_EXAMPLE)  # secrets left empty, as in the committed example
    with pytest.raises(MissingVariable, match="D2LORA_ADMIN_TOKEN"):
        load_compose(unset)


def test_every_interpolated_variable_is_documented_in_env_example():
    documented = set(read_env_file(ENV_EXAMPLE))
    assert referenced_variables(COMPOSE_FILE.read_text()) <= documented


def test_every_bind_mount_and_build_path_exists_in_the_repository(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
        if "build" in service:
            assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses volume {source!r}, not declared at the top level"


def test_the_service_reads_every_variable_it_is_given(api_services, env):
    known = settings_env_names()
    given = {key for service in api_services.values() for key in service["environment"]}
    given |= {key for key in env if key.startswith(SETTINGS_PREFIX)}
    given |= {key for key in dockerfile_env(dockerfile_instructions()) if key.startswith(SETTINGS_PREFIX)}
    assert given <= known, f"not service settings: {sorted(given - known)}"


def test_replicas_expose_the_port_the_service_listens_on_and_publish_none(api_services):
    from service.settings import Settings

    image_env = dockerfile_env(final_stage(dockerfile_instructions()))
    listens_on = Settings(
        **{k.removeprefix(SETTINGS_PREFIX).lower(): v for k, v in image_env.items() if k.startswith(SETTINGS_PREFIX)}
    ).port
    for name, service in api_services.items():
        assert [int(p) for p in service["expose"]] == [listens_on], name
        assert "ports" not in service, f"{name}: a published port would stop `--scale` (HAProxy publishes the API)"


def test_api_services_mount_the_data_and_models_volumes_where_the_image_keeps_them(api_services):
    image_env = dockerfile_env(final_stage(dockerfile_instructions()))
    expected = {image_env["D2LORA_DATA_DIR"], image_env["D2LORA_CACHE_DIR"]}
    for name, service in api_services.items():
        assert {volume.split(":")[1] for volume in service["volumes"]} == expected, name


def test_gpu_profile_reserves_an_nvidia_device_and_cpu_does_not(api_services):
    cpu, gpu = api_services["d2lora"], api_services["d2lora-gpu"]
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in cpu
    assert {cpu["build"]["args"]["VARIANT"], gpu["build"]["args"]["VARIANT"]} == {"cpu", "gpu"}


def test_default_profile_in_env_example_starts_exactly_one_api_service(env, api_services):
    active = set(env["COMPOSE_PROFILES"].split(","))
    assert sum(bool(active & set(s["profiles"])) for s in api_services.values()) == 1


def test_secrets_come_from_the_env_file_never_from_the_image_or_the_repository(env):
    example = read_env_file(ENV_EXAMPLE)
    assert all(example[name] == "" for name in SECRETS), "the committed example must not hold a secret"
    image_text = " ".join(ins.arguments for ins in dockerfile_instructions(DOCKERFILE) if ins.keyword in ("ENV", "ARG"))
    assert not any(name in image_text for name in SECRETS)
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must be git-ignored"
