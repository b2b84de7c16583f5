"""Cluster definitions and the image: KubeRay manifests, the Ray cluster launcher YAML, the Dockerfile, compose.yaml.

They must name one Ray version, one Python version and one image tag (those of pyproject.toml), have what KubeRay
and Ray require, and point at entry points and configs that exist and validate.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from mae_service.config import load_config

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
AWS_YAML = ROOT / "cluster" / "aws.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
APP_DIR = "/home/ray/mae-service"  # where the image puts the project (Dockerfile WORKDIR)
BIN = Path(sys.executable).parent

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_VERSION = next(
    re.fullmatch(r"ray\[[^\]]*\]==(\S+)", d).group(1)
    for d in PYPROJECT["project"]["dependencies"]
    if d.startswith("ray[")
)
PY_TAG = "py" + re.search(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"]).expand(r"3\1")
APP_IMAGE = re.compile(rf"[a-z0-9.\-/:]*/?mae-service:{re.escape(VERSION)}")
SECRET_NAMES = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.I)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


MANIFESTS = [(p.name, i, d) for p in sorted(KUBERAY.glob("*.yaml")) for i, d in enumerate(_docs(p))]
RAYCLUSTER = next(d for _, _, d in MANIFESTS if d["kind"] == "RayCluster")
RAYJOBS = [(name, d) for name, _, d in MANIFESTS if d["kind"] == "RayJob"]


def _cluster_specs():
    for name, _, d in MANIFESTS:
        yield name, d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) for the head and every worker group."""
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]
    ]


def _gpus(template: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in template["spec"]["containers"]
    )


def _cpus(template: dict) -> float:
    return sum(float(c["resources"]["limits"]["cpu"]) for c in template["spec"]["containers"])


def _dockerfile() -> str:
    return DOCKERFILE.read_text()


# ---- versions and tags ----------------------------------------------------------------------------------------------
def test_dockerfile_base_is_the_pinned_ray_and_python_gpu_image():
    base = re.search(r"^FROM\s+(\S+)", _dockerfile(), re.M).group(1)
    m = re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-{PY_TAG}-(cu\d+|gpu)", base)
    assert m, f"FROM {base}: expected rayproject/ray:{RAY_VERSION}-{PY_TAG}-cuXXX"
    # The base image's CUDA is that of the torch wheels the project installs.
    torch_version = (
        Path(__import__("importlib.util").util.find_spec("torch").origin).parent / "version.py"
    ).read_text()
    cuda = re.search(r"^cuda\s*(?::\s*\S+)?\s*=\s*'([\d.]+)'", torch_version, re.M)
    if cuda:
        major, minor = cuda.group(1).split(".")[:2]
        assert m.group(1) == f"cu{major}{minor}", f"torch is built for CUDA {cuda.group(1)}, the image has {m.group(1)}"
    assert f"ray.__version__ == '{RAY_VERSION}'" in _dockerfile()
    assert f'org.opencontainers.image.version="{VERSION}"' in _dockerfile()


def test_one_ray_version_and_one_app_image_everywhere():
    images = set()
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, name
        for _, template in _groups(spec):
            images |= {c["image"] for c in template["spec"]["containers"]}
    aws = yaml.safe_load(AWS_YAML.read_text())
    images.add(aws["docker"]["image"])
    compose = yaml.safe_load(COMPOSE.read_text())
    built = [s for s in compose["services"].values() if "build" in s]
    assert built and all(s["build"]["dockerfile"] == "docker/Dockerfile" for s in built)
    images |= {s["image"] for s in built}
    assert len({i.rsplit(":", 1)[1] for i in images}) == 1, images
    for image in images:
        assert APP_IMAGE.fullmatch(image), f"{image}: expected <registry>/mae-service:{VERSION}"
    # One name across the Kubernetes and VM definitions (compose builds a local, unprefixed tag).
    assert len(images - {s["image"] for s in built}) == 1, images


# ---- KubeRay --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "index", "doc"), MANIFESTS, ids=[f"{p}#{i}" for p, i, _ in MANIFESTS])
def test_manifest_has_what_kuberay_requires(path, index, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]

    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert isinstance(params, dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), (
            f"rayStartParams must map strings to strings (quote numbers): {params}"
        )
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must run no tasks"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names)
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
    for _, template in _groups(spec):
        containers = template["spec"]["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"] == {"mode": "token", "secretName": "mae-ray-token"}

    gpu = [(n, t) for n, t in _groups(spec) if _gpus(t) > 0]
    cpu = [(n, t) for n, t in _groups(spec)[1:] if _gpus(t) == 0]
    assert gpu and cpu, "a GPU worker group and a CPU-only (decode) worker group"
    for _, t in gpu:
        assert any(tol.get("key") == "nvidia.com/gpu" for tol in t["spec"].get("tolerations", []))
    for _, t in gpu + cpu:
        volumes = {v["name"]: v for v in t["spec"]["volumes"]}
        shm = [m for c in t["spec"]["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"

    if doc["kind"] == "RayJob":
        js = doc["spec"]
        assert js["entrypoint"].strip()
        assert js["entrypointNumCpus"] >= 1, "the driver must not land on the head (num-cpus 0)"
        assert js["shutdownAfterJobFinishes"] is True and js["ttlSecondsAfterFinished"] > 0
        assert js.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
        assert js["rayClusterSpec"] == RAYCLUSTER["spec"], "RayJob clusters must stay identical to raycluster.yaml"


def test_pod_templates_are_valid_kubernetes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for name, spec in _cluster_specs():
        for group, template in _groups(spec):
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{group}-x", **template.get("metadata", {})},
                "spec": template["spec"],
            }
            try:
                kubernetes_validate.validate(pod, "1.33.0", strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name} {group}: {e.message} at {list(e.path)}")


def test_credentials_come_from_secrets_only():
    for name, spec in _cluster_specs():
        for group, template in _groups(spec):
            for c in template["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                for var in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "mae-service-env", (name, group, var)
                literal = [n for n, e in env.items() if "value" in e and SECRET_NAMES.search(n)]
                assert not literal, f"{name} {group}: credentials as literal values: {literal}"


@pytest.mark.parametrize(("path", "job"), RAYJOBS, ids=[p for p, _ in RAYJOBS])
def test_rayjob_entrypoint_exists_and_its_config_validates_and_fits(path, job):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(APP_DIR + "/"), argv
    script = ROOT / argv[1][len(APP_DIR) + 1 :]
    assert script.is_file(), f"{argv[1]} is not in the repository (the image copies jobs/ to {APP_DIR}/jobs)"
    assert argv[2] == "--config"
    config = ROOT / argv[3][len(APP_DIR) + 1 :]
    cfg = load_config(config, argv[4:])  # raises ConfigError naming every problem

    # The cluster can hold the job: one GPU per training worker, train.cpus_per_worker CPUs beside each GPU.
    spec = job["spec"]["rayClusterSpec"]
    gpu = [g for g in spec["workerGroupSpecs"] if _gpus(g["template"]) > 0]
    assert cfg.train.use_gpu
    per_pod = _gpus(gpu[0]["template"])
    assert cfg.train.num_workers <= sum(g["maxReplicas"] * _gpus(g["template"]) for g in gpu)
    assert per_pod * cfg.train.cpus_per_worker < _cpus(gpu[0]["template"]), "leave CPUs for decoding on GPU pods"


# ---- Ray cluster launcher -------------------------------------------------------------------------------------------
def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_aws_yaml_validates_against_rays_schema():
    config = yaml.safe_load(AWS_YAML.read_text())
    jsonschema.validate(config, _ray_schema())
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # Ray's own checks after filling in the AWS defaults


def test_aws_yaml_rejects_a_typo_so_the_schema_check_can_fail():
    config = yaml.safe_load(AWS_YAML.read_text())
    config["available_node_types"]["ray.worker.gpu"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


def test_aws_yaml_has_the_same_node_roles_and_token_auth():
    config = yaml.safe_load(AWS_YAML.read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers)
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0 for t in workers)
    assert sum(t["max_workers"] for t in workers) <= config["max_workers"]
    for cmd in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in cmd and "ray start" in cmd
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert not [o for o in config["docker"]["run_options"] if "AWS_SECRET" in o or "AWS_ACCESS_KEY" in o]


# ---- Dockerfile -----------------------------------------------------------------------------------------------------
def test_dockerfile_installs_the_project_where_the_manifests_look_and_bakes_no_secrets():
    text = _dockerfile()
    assert re.search(rf"^WORKDIR\s+{re.escape(APP_DIR)}\s*$", text, re.M)
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the image must run as a non-root user"
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+\s*$", text, re.M)
    sources = [s for line in copied for s in line.split()]
    assert {"pyproject.toml", "mae_service", "jobs"} <= set(sources)
    for s in sources:
        assert (ROOT / s).exists(), f"COPY {s}: not in the repository"
    allowed = [
        line[1:].strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    assert set(sources) <= set(allowed), ".dockerignore must let every COPY source into the build context"
    for line in re.findall(r"^(?:ENV|ARG)\s+(.+)$", text, re.M):
        assert not SECRET_NAMES.search(line), f"no credentials in the image: {line}"


# ---- compose --------------------------------------------------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _url_host_port(url: str) -> tuple[str, int]:
    m = re.fullmatch(r"\w+://(?:[^@/]*@)?([\w.\-]+):(\d+)(/.*)?", url)
    assert m, url
    return m.group(1), int(m.group(2))


def _flag(command: list[str], name: str) -> str:
    for i, arg in enumerate(command):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return command[i + 1]
    raise AssertionError(f"{name} not in {command}")


def test_compose_services_reference_each_other_consistently():
    services = _compose()["services"]
    assert {"s3", "postgres", "mlflow", "ray-head"} <= set(services)
    for name, s in services.items():
        for dep in s.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"

    s3_port = int(_flag(services["s3"]["command"], "-s3.port"))
    pg = services["postgres"]["environment"]
    mlflow_cmd = services["mlflow"]["command"]
    mlflow_port = int(_flag(mlflow_cmd, "--port"))

    # MLflow: PostgreSQL backend store, artifacts in a bucket that the buckets job creates.
    backend = _flag(mlflow_cmd, "--backend-store-uri")
    assert backend.startswith(f"postgresql://{pg['POSTGRES_USER']}:")
    assert _url_host_port(backend) == ("postgres", 5432) and backend.endswith("/" + pg["POSTGRES_DB"])
    bucket = re.fullmatch(r"s3://([^/]+)/.*", _flag(mlflow_cmd, "--artifacts-destination")).group(1)
    assert bucket in services["buckets"]["environment"]["BUCKETS"].split()
    assert f"mlflow:{mlflow_port}" in _flag(mlflow_cmd, "--allowed-hosts").split(",")

    # Every S3 client points at the store's service name and port, with the same credentials.
    for name in ("buckets", "mlflow", "ray-head"):
        env = services[name]["environment"]
        assert _url_host_port(env["AWS_ENDPOINT_URL"]) == ("s3", s3_port), name
        assert "S3_ACCESS_KEY" in env["AWS_ACCESS_KEY_ID"] and "S3_SECRET_KEY" in env["AWS_SECRET_ACCESS_KEY"]
    assert _url_host_port(services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"]) == ("s3", s3_port)

    head = services["ray-head"]
    assert _url_host_port(head["environment"]["MLFLOW_TRACKING_URI"]) == ("mlflow", mlflow_port)
    assert head["environment"]["RAY_AUTH_MODE"] == "token"
    assert (ROOT / "docker" / head["build"]["context"] / head["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_compose_secrets_are_required_variables_listed_in_env_example():
    text = COMPOSE.read_text()
    used = dict(re.findall(r"\$\{(\w+)((?::?[-?][^}]*)?)\}", text))
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    assert set(used) <= set(example), f"not in docker/.env.example: {set(used) - set(example)}"
    for var in ("S3_ACCESS_KEY", "S3_SECRET_KEY", "POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"):
        uses = re.findall(rf"\$\{{{var}(:?[-?][^}}]*)?\}}", text)
        assert any(u.startswith(":?") for u in uses), f"${{{var}}} must be required (:?), never defaulted"
        assert not any(u.startswith((":-", "-")) for u in uses), var
