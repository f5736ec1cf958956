"""cluster.yaml, the `ray up` config for the reference job (three p5.48xlarge, 24 H100s).

Ray's own validation runs on it as `ray up` runs it before it calls AWS (`prepare_config`,
then `validate_config` against ray-schema.json), and the commands, images and run options
each node gets are read through Ray's own resolution (`AutoscalingConfig`, what the head's
autoscaler uses to start the workers). Then the choices the job depends on: three nodes of
one GPU type, resources as Ray detects them, the SGLang image, a dashboard nobody outside
reaches, the shared file system on every node at the recipe's paths, and pyproject.toml's
dependencies installed on every node. No AWS credentials, no network.
"""

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
PYPROJECT = REPO / "pyproject.toml"
RECIPE = REPO / "recipes" / "qwen3-30b-a3b-24gpu.yaml"

INSTANCE_TYPE = "p5.48xlarge"
SGLANG_IMAGE = "lmsysorg/sglang:v0.5.23-cu129"
# Where the shared file system appears in the containers: the directories the recipes use.
SHARED_ROOT = "/shared"
SHARED_DIRS = ("/models", "/data", "/checkpoints", "/outputs")

# p5.48xlarge as EC2's DescribeInstanceTypes describes it (the fields Ray reads).
P5_DESCRIPTION = {
    "InstanceType": INSTANCE_TYPE,
    "VCpuInfo": {"DefaultVCpus": 192},
    "MemoryInfo": {"SizeInMiB": 2 * 1024 * 1024},
    "GpuInfo": {
        "Gpus": [
            {
                "Name": "H100",
                "Manufacturer": "NVIDIA",
                "Count": 8,
                "MemoryInfo": {"SizeInMiB": 81920},
            }
        ]
    },
}


def raw_config() -> dict[str, Any]:
    """The file as `ray up` reads it."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return raw_config()


@pytest.fixture(scope="module")
def resolved():
    """Ray's view of the config: prepared (defaults merged, setup commands merged, per-type
    worker counts filled) and validated, with the per-node-type accessors Ray itself uses."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    return AutoscalingConfig(raw_config(), skip_content_hash=True)


def node_view(config: dict[str, Any], resolved, node_type: str) -> dict[str, Any]:
    """What one node of `node_type` runs: initialization commands (on the host), setup
    commands (in the container), the container's image and run options."""
    is_head = node_type == config["head_node_type"]
    docker = resolved.get_docker_config(node_type)
    run_options = list(docker.get("run_options", [])) + list(
        docker.get("head_run_options" if is_head else "worker_run_options", [])
    )
    if is_head:  # `ray up` starts the head itself, with the global lists
        init = resolved.get_config("initialization_commands")
        setup = resolved.get_head_setup_commands()
    else:
        init = resolved.get_initialization_commands(node_type)
        setup = resolved.get_worker_setup_commands(node_type)
    return {
        "init": list(init),
        "setup": list(setup),
        "image": docker["image"],
        "pull_before_run": docker.get("pull_before_run", True),
        "run_options": run_options,
    }


def all_node_views(config, resolved) -> dict[str, dict[str, Any]]:
    return {t: node_view(config, resolved, t) for t in config["available_node_types"]}


def simple_commands(command: str) -> list[list[str]]:
    """Split a shell command line into its simple commands' words (quotes honoured)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token and set(token) <= set(";&|()<>"):
            if words:
                commands.append(words)
            words = []
        else:
            words.append(token)
    if words:
        commands.append(words)
    return commands


def pip_installs(commands: list[str]) -> list[dict[str, Requirement]]:
    """Each `pip install` among `commands`: its requirements by canonical name."""
    installs = []
    for command in commands:
        for words in simple_commands(command):
            if "pip" not in words or "install" not in words[words.index("pip") :]:
                continue
            args = words[words.index("install", words.index("pip")) + 1 :]
            requirements: dict[str, Requirement] = {}
            skip_next = False
            for arg in args:
                if skip_next:
                    skip_next = False
                elif arg in ("-c", "--constraint", "-r", "--requirement", "-i", "--index-url"):
                    skip_next = True
                elif not arg.startswith("-"):
                    try:
                        requirement = Requirement(arg)
                    except InvalidRequirement:
                        continue
                    requirements[canonicalize_name(requirement.name)] = requirement
            installs.append(requirements)
    return installs


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}


def test_ray_validates_it_as_ray_up_does(config):
    """`ray up` (`_bootstrap_config`): prepare_config, then validate_config against
    ray-schema.json; the provider's own steps after that need AWS."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # Ray's AWS defaults (a nightly Ray wheel in setup_commands, spot workers, m5.large)
    # must not leak in: the file sets every list and every node type itself.
    assert (
        prepared["head_setup_commands"] == config["setup_commands"] + config["head_setup_commands"]
    )
    assert (
        prepared["worker_setup_commands"]
        == config["setup_commands"] + config["worker_setup_commands"]
    )
    assert set(prepared["available_node_types"]) == set(config["available_node_types"])


def test_a_head_and_two_workers_all_p5(config, resolved):
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = [t for t in types if t != head]
    assert len(workers) == 1, "one worker node type"
    (worker,) = workers
    node_types = resolved.get_node_type_configs()
    assert node_types[worker].min_worker_nodes == node_types[worker].max_worker_nodes == 2
    # Ray counts the head in its own type: the head, and no other node of that type
    assert node_types[head].max_worker_nodes == 1, "no extra nodes of the head's type"
    assert config["max_workers"] == 2
    for name in types:
        node_config = resolved.get_cloud_node_config(name)
        assert node_config["InstanceType"] == INSTANCE_TYPE, name
        # a spot reclaim would end a multi-hour run: on-demand (or a reservation) only
        assert node_config.get("InstanceMarketOptions", {}).get("MarketType") != "spot", name
    # the head and the workers are the same machine, two separate node_config mappings
    assert types[head]["node_config"] == types[worker]["node_config"]
    assert types[head]["node_config"] is not types[worker]["node_config"]


def ray_detected_resources(description: dict[str, Any], is_head: bool) -> dict[str, int]:
    """What `ray up` fills into a node type's resources from EC2's instance description,
    as AWSNodeProvider.fillout_available_node_types_resources does (not importable here: it
    needs boto3): the vCPUs; memory, for worker types only, as the total less the default
    object-store share; the accelerators, through Ray's own accelerator managers."""
    import ray._private.accelerators as accelerators
    import ray._private.ray_constants as ray_constants

    instance_type = description["InstanceType"]
    instances = {instance_type: description}
    resources = {"CPU": description["VCpuInfo"]["DefaultVCpus"]}
    if not is_head:
        total = int(description["MemoryInfo"]["SizeInMiB"]) * 1024 * 1024
        resources["memory"] = int(
            total * (1 - ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION)
        )
    for manager in accelerators.get_all_accelerator_managers():
        count = manager.get_ec2_instance_num_accelerators(instance_type, instances)
        kind = manager.get_ec2_instance_accelerator_type(instance_type, instances)
        if count:
            resources[manager.get_resource_name()] = count
            if kind:
                resources[f"accelerator_type:{kind}"] = 1
    return resources


def test_resources_are_those_ray_detects(config, resolved):
    """The head trains too: it advertises its 8 GPUs and 192 CPUs as detected, not CPU: 0."""
    for name in config["available_node_types"]:
        is_head = name == config["head_node_type"]
        assert resolved.get_node_resources(name) == ray_detected_resources(
            P5_DESCRIPTION, is_head
        ), name
        assert resolved.get_node_resources(name)["GPU"] == 8
    counts = {t: c.min_worker_nodes for t, c in resolved.get_node_type_configs().items()}
    counts[config["head_node_type"]] = 1
    assert sum(resolved.get_node_resources(t)["GPU"] * n for t, n in counts.items()) == 24


def test_every_node_runs_the_sglang_image_with_the_gpu_options(config, resolved):
    for name, node in all_node_views(config, resolved).items():
        # the SGLang image plus rsync, built on the host before the container starts
        builds = [c for c in node["init"] if f"docker build -t {node['image']} " in c]
        assert builds, f"{name}: no initialization command builds {node['image']}"
        assert f"FROM {SGLANG_IMAGE}\\n" in builds[0], name
        assert "rsync" in builds[0], name
        assert node["pull_before_run"] is False, f"{name}: {node['image']} is local only"
        options = " ".join(node["run_options"]).split()
        assert "--gpus" in options and options[options.index("--gpus") + 1] == "all", name
        assert "--ipc=host" in options, name
        assert any(o.startswith("--shm-size=") for o in options), name


def test_the_dashboard_is_reached_only_through_ssh(config, resolved):
    # Naming security groups for every node type keeps Ray from creating its own (whose
    # default rules let SSH in from anywhere); no extra rule opens anything to the world.
    for name in config["available_node_types"]:
        groups = resolved.get_cloud_node_config(name).get("SecurityGroupIds")
        assert groups, f"{name}: without SecurityGroupIds Ray creates an open-SSH group"
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])
        )
        if world:
            covers_8265 = rule.get("IpProtocol") == "-1" or (
                rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", 65535)
            )
            assert not covers_8265, f"security group rule opens the dashboard: {rule}"
    start = " ".join(resolved.get_head_start_ray_commands())
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", start), start
    for node in all_node_views(config, resolved).values():
        options = " ".join(node["run_options"])
        assert "8265" not in options and not re.search(r"(^|\s)(-p|--publish)\b", options)


def test_the_shared_file_system_is_on_every_node(config, resolved):
    region = config["provider"]["region"]
    for name, node in all_node_views(config, resolved).items():
        mounts = [
            c for c in node["init"] if re.search(rf"\bmount\s+-t\s+\S+.*\s{SHARED_ROOT}(\s|;|$)", c)
        ]
        assert mounts, f"{name}: no initialization command mounts {SHARED_ROOT}"
        assert f"REGION={region};" in mounts[0], f"{name}: the mount names another region"
        for directory in SHARED_DIRS:
            assert f"-v {SHARED_ROOT}{directory}:{directory}" in node["run_options"], (
                f"{name}: {directory} is not bound from {SHARED_ROOT}"
            )
            assert directory in mounts[0], f"{name}: {SHARED_ROOT}{directory} not created"
        checks = [c for c in node["setup"] if "mountpoint -q" in c]
        assert checks and all(d in checks[0] for d in SHARED_DIRS), (
            f"{name}: the setup commands do not check the shared directories"
        )


def absolute_paths(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in absolute_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def test_the_reference_recipe_paths_are_on_the_shared_file_system():
    paths = absolute_paths(yaml.safe_load(RECIPE.read_text()))
    assert paths, f"{RECIPE.name} names no path"
    for path in paths:
        assert any(path == d or path.startswith(d + "/") for d in SHARED_DIRS), (
            f"{RECIPE.name}: {path} is not under the shared directories {SHARED_DIRS}"
        )


def test_every_node_installs_pyprojects_dependencies(config, resolved):
    wanted = pyproject_requirements()
    # the two pins the cluster cannot do without, read from pyproject (not hard-coded)
    assert "ray" in wanted and "default" in wanted["ray"].extras
    assert "megatron-core" in wanted
    for name, node in all_node_views(config, resolved).items():
        installs = [i for i in pip_installs(node["setup"]) if "ray" in i]
        assert len(installs) == 1, f"{name}: expected one pip install of the dependencies"
        (installed,) = installs
        assert set(installed) == set(wanted), (
            f"{name}: setup installs {sorted(installed)}, pyproject has {sorted(wanted)}"
        )
        for key, requirement in wanted.items():
            got = installed[key]
            assert (got.extras, got.specifier, got.marker) == (
                requirement.extras,
                requirement.specifier,
                requirement.marker,
            ), f"{name}: setup installs {got}, pyproject.toml says {requirement}"
