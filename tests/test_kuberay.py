"""deploy/kuberay/: the KubeRay manifests (RayJob and RayCluster for the 8- and 24-GPU recipes),
the shared volume and the image.

Each manifest validates against deploy/kuberay/schema/kuberay-v1.schema.json: KubeRay's
ray.io/v1 RayCluster and RayJob fields around Kubernetes' own pod, service and volume schemas,
strict as `kubectl apply` is with a CRD (an unknown field is an error); the file's generator
says where each part comes from. A misspelled or mistyped field is shown to fail it. Then
what the job depends on: Ray's own reading of each cluster (the function its autoscaler uses
on a RayCluster) has the GPUs the entrypoint's recipe plans for, no more; each entrypoint is
the driver command docs/cluster.md submits; every Ray pod runs the same image, with the
shared volume at the recipes' paths and a shared-memory /dev/shm; the image installs
pyproject.toml's dependencies as cluster.yaml's nodes do; the dashboard is not exposed
outside the Kubernetes cluster. No Kubernetes cluster, no network.
"""

import copy
import importlib.util
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import driver
from config import UserError, load_config
from placement.cluster import synthetic_cluster
from placement.planner import plan_layout
from tests.test_cluster_yaml import SGLANG_IMAGE, SHARED_DIRS, pip_installs, pyproject_requirements
from tests.test_docs import commands_in

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "deploy" / "kuberay"
SCHEMA = KUBERAY / "schema" / "kuberay-v1.schema.json"
BUILD_SCHEMA = KUBERAY / "schema" / "build_schema.py"
DOCKERFILE = KUBERAY / "Dockerfile"
CLUSTER_DOC = REPO / "docs" / "cluster.md"
CLUSTER_YAML = REPO / "cluster.yaml"

RAY_JOBS = {
    "rayjob-8gpu.yaml": "recipes/qwen3-30b-a3b-8gpu.yaml",
    "rayjob-24gpu.yaml": "recipes/qwen3-30b-a3b-24gpu.yaml",
}
"""Each RayJob and the recipe its entrypoint runs."""
RAY_CLUSTERS = {
    "raycluster-8gpu.yaml": (
        "recipes/qwen3-30b-a3b-8gpu.yaml",
        "recipes/qwen3-30b-a3b-8gpu-dp-attention.yaml",
        "recipes/qwen3-30b-a3b-fp8-rollout.yaml",
    ),
    "raycluster-24gpu.yaml": (
        "recipes/qwen3-30b-a3b-24gpu.yaml",
        "recipes/qwen3-30b-a3b-24gpu-async.yaml",
    ),
}
"""Each RayCluster and the recipes its header says it is shaped for."""
SCHEMA_DEF = {
    "RayJob": "RayJob",
    "RayCluster": "RayCluster",
    "PersistentVolumeClaim": "io.k8s.api.core.v1.PersistentVolumeClaim",
    "Pod": "io.k8s.api.core.v1.Pod",
}
"""The schema definition each kind of document is checked against."""
CLAIM = "sluice-shared"
GPUS_PER_POD = 8


def documents() -> list[tuple[str, int, dict[str, Any]]]:
    """(file name, index in the file, document) of every YAML document in deploy/kuberay/."""
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                found.append((path.name, index, doc))
    return found


def manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / name).read_text())


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


def schema_errors(schema: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """What the schema finds wrong with `doc` (by its kind), as 'path: message' lines."""
    root = {**schema, "$ref": f"#/$defs/{SCHEMA_DEF[doc['kind']]}"}
    validator = jsonschema.Draft202012Validator(root)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


# --- the schema ------------------------------------------------------------------------------


def test_the_schema_is_sound_and_its_kuberay_part_is_its_generators(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    refs = set(re.findall(r'"\$ref": "#/\$defs/([^"]+)"', SCHEMA.read_text()))
    assert refs <= set(schema["$defs"]), f"dangling refs: {refs - set(schema['$defs'])}"
    # The KubeRay definitions are build_schema.py's, not edited by hand in the JSON file.
    spec = importlib.util.spec_from_file_location("build_schema", BUILD_SCHEMA)
    build_schema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_schema)
    for name, definition in build_schema.KUBERAY_DEFS.items():
        assert schema["$defs"][name] == definition, f"{name} differs from build_schema.py"


def test_every_manifest_validates(schema):
    docs = documents()
    kinds = sorted(doc["kind"] for _, _, doc in docs)
    assert kinds == sorted(["RayJob"] * 2 + ["RayCluster"] * 2 + ["PersistentVolumeClaim", "Pod"])
    for name, index, doc in docs:
        assert schema_errors(schema, doc) == [], f"{name} (document {index})"


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _rename(path: tuple, old: str, new: str) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        target = doc
        for key in path:
            target = target[key]
        target[new] = target.pop(old)

    return mutate


HEAD = ("spec", "rayClusterSpec", "headGroupSpec")
WORKER = ("spec", "rayClusterSpec", "workerGroupSpecs", 0)
HEAD_CONTAINER = (*HEAD, "template", "spec", "containers", 0)
MUTATIONS = {
    # (what is wrong, the mutation, where the schema must point)
    "head group: rayStartParam": (
        _rename(HEAD, "rayStartParams", "rayStartParam"),
        "$.spec.rayClusterSpec.headGroupSpec",
    ),
    "head group: no template": (
        lambda doc: doc["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"),
        "$.spec.rayClusterSpec.headGroupSpec",
    ),
    "worker group: replicas as text": (
        _set((*WORKER, "replicas"), "two"),
        "$.spec.rayClusterSpec.workerGroupSpecs[0].replicas",
    ),
    "worker group: minReplica": (
        _rename(WORKER, "minReplicas", "minReplica"),
        "$.spec.rayClusterSpec.workerGroupSpecs[0]",
    ),
    "container: volumeMount": (
        _rename(HEAD_CONTAINER, "volumeMounts", "volumeMount"),
        "$.spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]",
    ),
    "container: gpu limit as a list": (
        _set((*HEAD_CONTAINER, "resources", "limits", "nvidia.com/gpu"), [8]),
        "$.spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].resources.limits",
    ),
    "job: entrypoints": (_rename(("spec",), "entrypoint", "entrypoints"), "$.spec"),
    "job: submissionMode": (_set(("spec", "submissionMode"), "K8sMode"), "$.spec.submissionMode"),
    "job: an old apiVersion": (_set(("apiVersion",), "ray.io/v1alpha1"), "$.apiVersion"),
}


@pytest.mark.parametrize("what", sorted(MUTATIONS))
def test_a_wrong_field_is_rejected(schema, what):
    mutate, where = MUTATIONS[what]
    doc = copy.deepcopy(manifest("rayjob-24gpu.yaml"))
    mutate(doc)
    errors = schema_errors(schema, doc)
    assert errors, f"{what}: accepted"
    assert any(e.startswith(where + ":") or e.startswith(where + "[") for e in errors), errors


# --- the clusters against the recipes -------------------------------------------------------


def ray_node_types(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cluster's node types as Ray's autoscaler derives them from a RayCluster spec."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    ray_cr = {"metadata": {"name": doc["metadata"]["name"], "namespace": "default"}}
    ray_cr["spec"] = cluster_spec(doc)
    return _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]


def ray_nodes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The resources of each Ray node the cluster starts: the head, then each worker pod."""
    spec = cluster_spec(doc)
    node_types = ray_node_types(doc)
    nodes = [node_types["headgroup"]["resources"]]
    for group in spec["workerGroupSpecs"]:
        # KubeRay starts `replicas`; Ray's autoscaler keeps min..max: all three agree.
        replicas = group["replicas"] * group.get("numOfHosts", 1)
        node_type = node_types[group["groupName"]]
        assert node_type["min_workers"] == node_type["max_workers"] == replicas, group
        nodes += [node_type["resources"]] * replicas
    return nodes


def assert_the_recipe_fills_the_cluster(recipe: str, nodes: list[dict[str, Any]]) -> None:
    """The recipe's plan fits the cluster, uses every GPU of it, and needs every node."""
    assert (REPO / recipe).is_file(), recipe
    assert all(node["GPU"] == GPUS_PER_POD for node in nodes), nodes
    cpus = min(node["CPU"] for node in nodes)
    config = load_config(REPO / recipe)
    layout = plan_layout(synthetic_cluster(len(nodes), GPUS_PER_POD, cpus), config)
    assert layout.num_bundles == GPUS_PER_POD * len(nodes), f"{recipe}: GPUs left idle"
    with pytest.raises(UserError):
        plan_layout(synthetic_cluster(len(nodes) - 1, GPUS_PER_POD, cpus), config)


@pytest.mark.parametrize("name", sorted(RAY_JOBS))
def test_each_job_runs_the_driver_on_its_recipe_which_fills_the_cluster(name):
    doc = manifest(name)
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "driver.py"], argv
    driver.parse_args(argv[2:])  # a command the driver accepts (exits 2 otherwise)
    recipe = argv[argv.index("--config") + 1]
    assert recipe == RAY_JOBS[name]
    assert_the_recipe_fills_the_cluster(recipe, ray_nodes(doc))


@pytest.mark.parametrize("name", sorted(RAY_CLUSTERS))
def test_each_cluster_fits_the_recipes_it_is_for(name):
    doc = manifest(name)
    for recipe in RAY_CLUSTERS[name]:
        assert recipe in (KUBERAY / name).read_text(), f"{name}'s header does not name {recipe}"
        assert_the_recipe_fills_the_cluster(recipe, ray_nodes(doc))


def test_a_rayjob_runs_its_raycluster():
    for size in ("8gpu", "24gpu"):
        job, cluster = manifest(f"rayjob-{size}.yaml"), manifest(f"raycluster-{size}.yaml")
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], size
        assert job["metadata"]["name"] == cluster["metadata"]["name"] == f"sluice-{size}"


def documented_submissions() -> list[tuple[list[str], dict[str, Any]]]:
    """(entrypoint argv, runtime env) of each `ray job submit` in docs/cluster.md."""
    found = []
    for command in commands_in(CLUSTER_DOC):
        words = shlex.split(command.text)
        if words[:5] != ["uv", "run", "ray", "job", "submit"]:
            continue
        runtime_env = json.loads(words[words.index("--runtime-env-json") + 1])
        found.append((words[words.index("--") + 1 :], runtime_env))
    return found


def test_each_entrypoint_and_runtime_env_is_what_the_docs_submit():
    documented = documented_submissions()
    assert documented, "docs/cluster.md has no `uv run ray job submit`"
    image_workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    for name in RAY_JOBS:
        spec = manifest(name)["spec"]
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        # `--working-dir .` from a checkout is the image's copy of the checkout here
        assert runtime_env.pop("working_dir") == image_workdir, name
        entrypoint = shlex.split(spec["entrypoint"])
        assert (entrypoint, runtime_env) in documented, (
            f"{name}: docs/cluster.md submits no `{spec['entrypoint']}` with {runtime_env}"
        )


# --- the pods ---------------------------------------------------------------------------------


def ray_pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def ray_manifests() -> list[dict[str, Any]]:
    return [manifest(name) for name in (*RAY_JOBS, *RAY_CLUSTERS)]


def pinned_ray_version() -> str:
    (pin,) = pyproject_requirements()["ray"].specifier
    assert pin.operator == "==", pin
    return pin.version


def test_every_ray_pod_is_a_whole_gpu_node_with_the_same_container():
    containers = []
    for doc in ray_manifests():
        assert cluster_spec(doc)["rayVersion"] == pinned_ray_version()
        for pod in ray_pod_specs(doc):
            ray_container = pod["containers"][0]  # KubeRay's Ray container is the first
            resources = ray_container["resources"]
            assert resources["limits"] == resources["requests"], doc["metadata"]["name"]
            assert resources["limits"]["nvidia.com/gpu"] == GPUS_PER_POD
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                pod["tolerations"]
            )
            containers.append({k: v for k, v in ray_container.items() if k != "name"})
    assert all(c == containers[0] for c in containers), "the Ray containers differ"
    tag = SGLANG_IMAGE.split(":")[1]
    assert containers[0]["image"].endswith(f"/sluice:sglang-{tag}"), containers[0]["image"]


def test_the_shared_volume_and_shared_memory_are_in_every_ray_pod():
    claims = [doc for _, _, doc in documents() if doc["kind"] == "PersistentVolumeClaim"]
    assert [c["metadata"]["name"] for c in claims] == [CLAIM]
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    for doc in ray_manifests():
        for pod in ray_pod_specs(doc):
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
            for directory in SHARED_DIRS:  # cluster.yaml's: the recipes' paths
                mount = mounts[directory]
                assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == CLAIM
                assert mount["subPath"] == directory.strip("/")
                assert not mount.get("readOnly"), directory
            shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
            assert shm["medium"] == "Memory" and shm["sizeLimit"] == "256Gi"


def test_the_dashboard_stays_inside_the_kubernetes_cluster():
    """The head service is KubeRay's default ClusterIP, no ingress: the dashboard (and the
    GCS) are reached with `kubectl port-forward`, as cluster.yaml's through an SSH tunnel."""
    for doc in ray_manifests():
        head = cluster_spec(doc)["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress") and "headService" not in head
        for pod in ray_pod_specs(doc):
            assert not pod.get("hostNetwork")
            for port in pod["containers"][0].get("ports", []):
                assert "hostPort" not in port


# --- the image --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_the_image_is_sglangs_with_pyprojects_dependencies():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", SGLANG_IMAGE)
    runs = [args for op, args in instructions if op == "RUN"]
    installs = [i for i in pip_installs(runs) if i]
    assert len(installs) == 1, installs
    wanted = {name: str(r) for name, r in pyproject_requirements().items()}
    assert {name: str(r) for name, r in installs[0].items()} == wanted
    # pinned to the image's GPU stack exactly as cluster.yaml's nodes are
    pattern = r"grep -iE '(\^\([^']+\)==)'"
    (ours,) = re.findall(pattern, " ".join(runs))
    (theirs,) = re.findall(pattern, CLUSTER_YAML.read_text())
    assert ours == theirs
    assert "-c /tmp/sluice-image-constraints.txt" in " ".join(runs)
    copies = [args for op, args in instructions if op == "COPY"]
    workdir = [args for op, args in instructions if op == "WORKDIR"]
    assert copies == [". /sluice"] and workdir == ["/sluice"]


def test_the_image_leaves_out_what_git_ignores():
    ignored = (KUBERAY / "Dockerfile.dockerignore").read_text().split()
    for entry in (REPO / ".gitignore").read_text().split():
        bare = entry.strip("/")
        assert bare in ignored or f"**/{bare}" in ignored, f".gitignore's {entry}"
    assert ".git" in ignored
