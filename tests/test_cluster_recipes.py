"""The cluster recipes (recipes/qwen3-30b-a3b-*.yaml) against the seed and a fake Ray cluster.

What the tests show:
- every recipe loads and passes every start-up check (backend, engine, reward, prompt files,
  checkpoint to load) with its shared-file-system paths re-rooted in a temp dir holding
  Qwen3-30B-A3B's config.json (and the FP8 one's), prompt files and a converted checkpoint;
- `driver.py --dry-run` of each plans on a `ray.cluster_utils.Cluster` of 8-GPU nodes (1 for
  the 8-GPU recipes, 3 for the 24-GPU one): tensor-parallel groups stay inside a node, the
  24-GPU engine spans the three nodes with one server each, and every printed SGLang command
  line parses with sglang 0.5.23's own parser to the recipe's values;
- the seed's argument arrays (OPTIMIZER_ARGS, PERF_ARGS, SGLANG_ARGS, as written there) pasted
  over a recipe stripped of those settings give the recipe's own resolved config and server
  arguments, so each recipe is the seed's job, key for key;
- the recipes that repeat the 8-GPU one (no recipe inheritance) differ from it only where they
  say they do.

The Ray cluster is the expensive part (seconds per node on a 2-core machine): one module-wide
cluster is started with one node and grown to three for the 24-GPU recipe.
"""

import functools
import json
import math
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

import driver
from actors.preflight import checkpoint_to_load
from actors.weight_sync import transport_backend
from config import UserError, load_config
from config.loader import to_dict
from config.seed_flags import SEED_FLAGS
from data.sources import load_train_and_eval
from inference import check_engine_config
from inference.sglang.flags import CLI_PREFIX, as_argv
from inference.sglang.launch import read_num_experts, resolve_server_args, server_launches
from models.fp8_checkpoint import rollout_fp8_format
from models.reference import qwen3_8b_config, qwen3_30b_a3b_config
from placement.cluster import read_cluster_shape, synthetic_cluster
from placement.planner import plan_layout
from rl.environments import load_environment
from rl.rewards import load_reward_fn
from rl.tools import load_tool_fn
from tasks import python_math
from tests.sglang_args import resolved as sglang_resolve
from tests.sglang_args import resolved_fields
from tools.conversion import read_hf_config
from training import check_backend_config
from training.loss import LossSettings

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
R8 = REPO / "recipes" / "qwen3-30b-a3b-8gpu.yaml"
R8_DP = REPO / "recipes" / "qwen3-30b-a3b-8gpu-dp-attention.yaml"
R24 = REPO / "recipes" / "qwen3-30b-a3b-24gpu.yaml"
R_FP8 = REPO / "recipes" / "qwen3-30b-a3b-fp8-rollout.yaml"
R24_ASYNC = REPO / "recipes" / "qwen3-30b-a3b-24gpu-async.yaml"
"""Disaggregated and one-step-off: checked by its own dry-run test."""
R_TOOL = REPO / "recipes" / "qwen3-30b-a3b-python-tool.yaml"
"""The 8-GPU recipe's job as Python-tool episodes (tasks/python_math.py)."""
CLUSTER_RECIPES = [R8, R8_DP, R24, R_FP8]
GPUS_PER_NODE = 8
NODE = {"num_gpus": GPUS_PER_NODE, "num_cpus": GPUS_PER_NODE}
"""A fake node: 8 GPUs, and a CPU for each (the recipes reserve 1 CPU per GPU bundle)."""

SHARED_ROOTS = ("/models/", "/data/", "/checkpoints/", "/outputs/")
"""Where the cluster recipes keep their files: the cluster's shared file system."""

PATH_KEYS = (
    "model.hf_checkpoint",
    "data.prompt_data",
    "data.eval_data",
    "checkpoint.load",
    "checkpoint.save",
    "logging.output_dir",
)
"""Config keys holding paths; a test re-roots each absolute one under its temp dir."""


def seed_array(text: str) -> list[str]:
    """One of the seed's bash arrays as written there, `$(seq FIRST STEP LAST)` expanded."""
    words = []
    for word in shlex.split(text.replace("$(seq 16 8 256)", "SEQ_16_8_256")):
        words += [str(n) for n in range(16, 257, 8)] if word == "SEQ_16_8_256" else [word]
    return words


# The seed's arrays, copied from the guide with its "..." left out.
OPTIMIZER_ARGS = seed_array(
    "--optimizer-cpu-offload --overlap-cpu-optimizer-d2h-h2d --use-precision-aware-optimizer"
)
PERF_ARGS = seed_array(
    "--tensor-model-parallel-size 4 --sequence-parallel --pipeline-model-parallel-size 1 "
    "--context-parallel-size 1 --expert-model-parallel-size 8 --expert-tensor-parallel-size 1"
)
SGLANG_ARGS = seed_array(
    "--rollout-num-gpus-per-engine 8 --sglang-mem-fraction-static 0.7 --sglang-enable-ep-moe "
    "--sglang-cuda-graph-bs 1 2 4 8 $(seq 16 8 256)"
)
DP_ATTENTION_ARGS = seed_array("--sglang-enable-dp-attention --sglang-dp-size 8")
SGLANG_ARGS_24 = seed_array(
    "--rollout-num-gpus-per-engine 24 --sglang-mem-fraction-static 0.7 --sglang-enable-ep-moe "
    "--sglang-enable-dp-attention --sglang-dp-size 3 --sglang-moe-dense-tp-size 1 "
    "--sglang-enable-dp-lm-head --sglang-ep-num-redundant-experts 16"
)
FP8_ARGS = seed_array("--hf-checkpoint /root/Qwen3-30B-A3B-FP8")  # path re-rooted by the test


# --- the cluster's shared file system, in a temp dir ----------------------------------------


FP8_QUANTIZATION = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
"""The quantization_config of Qwen3-30B-A3B-FP8's config.json (block-wise e4m3)."""

MATH_ROWS = [
    {"prompt": "What is 7 * 6? Put the answer in \\boxed{}.", "label": "42"},
    {"prompt": "Solve x + 3 = 10 for x.", "label": "7"},
    {"prompt": "What is 1/2 + 1/4?", "label": "\\frac{3}{4}"},
]


def write_reference_files(models: Path, data: Path) -> None:
    """What the reference job reads, in `models` and `data`: Qwen3-30B-A3B's config.json, the
    FP8 checkpoint's, the torch_dist conversion's marker, and dapo-math-17k / AIME 2024 prompt
    files of MATH_ROWS (tests/test_slime_script.py lays them out as slime's /root)."""
    qwen3_30b_a3b_config().save_pretrained(models / "Qwen3-30B-A3B")
    fp8 = models / "Qwen3-30B-A3B-FP8"
    qwen3_30b_a3b_config().save_pretrained(fp8)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = FP8_QUANTIZATION
    (fp8 / "config.json").write_text(json.dumps(config))
    # tools/convert_hf_to_torch_dist.py's output ends with metadata.json; the loop's start-up
    # check (which checkpoint to load) reads only that.
    converted = models / "Qwen3-30B-A3B_torch_dist"
    converted.mkdir()
    (converted / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    write_math_rows(data, "dapo-math-17k/dapo-math-17k.jsonl", "aime-2024/aime-2024.jsonl")


def write_math_rows(data: Path, *names: str) -> None:
    for name in names:
        path = data / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in MATH_ROWS))


@pytest.fixture(scope="module")
def shared_fs(tmp_path_factory) -> Path:
    """A temp stand-in for the cluster's shared file system, holding what the recipes name."""
    root = tmp_path_factory.mktemp("shared")
    write_reference_files(root / "models", root / "data")
    qwen3_8b_config().save_pretrained(root / "models" / "Qwen3-8B")  # recipes/your-model.yaml
    write_math_rows(root / "data", "train.jsonl", "test.jsonl")
    for name in ("dapo-math-17k/dapo-math-17k", "aime-2024/aime-2024"):  # R_TOOL's prompts
        rows = root / "data" / name
        python_math.main(f"{rows}.jsonl", f"{rows}-python-tool.jsonl")
    return root


def raw_recipe(recipe: Path) -> dict[str, Any]:
    return yaml.safe_load(recipe.read_text(encoding="utf-8"))


def dotted(values: Any, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), values)


def on_shared_fs(recipe: Path, root: Path, skip: set[str] = frozenset()) -> list[str]:
    """Overrides moving every absolute path the recipe names (but keys `skip`) under `root`."""
    config = load_config(recipe)
    argv = []
    for key in PATH_KEYS:
        value = dotted(config, key)
        if key not in skip and isinstance(value, str) and value.startswith("/"):
            argv += [f"--{key}", str(root / value.lstrip("/"))]
    return argv


def gpus_needed(config) -> int:
    engines = config.rollout.num_engines * config.rollout.gpus_per_engine
    return config.train.num_workers + (0 if config.placement.colocate else engines)


def nodes_needed(recipe: Path) -> int:
    return math.ceil(gpus_needed(load_config(recipe)) / GPUS_PER_NODE)


# --- SGLang's own parser --------------------------------------------------------------------


def printed_commands(out: str) -> list[list[str]]:
    """The dry run's `launch_server` command lines, as argv, with its port placeholders
    replaced by numbers (DIST_PORT -> 20000, PORT -> 30000)."""
    commands = []
    for line in out.splitlines():
        if line.startswith("  CUDA_VISIBLE_DEVICES="):
            words = shlex.split(line)
            assert words[1:4] == ["python", "-m", "sglang.launch_server"], line
            argv = [w.replace("DIST_PORT", "20000") for w in words[4:]]
            commands.append(["30000" if w == "PORT" else w for w in argv])
    return commands


def sglang_value(value: Any) -> Any:
    """A recipe's server_args value as sglang's parsed ServerArgs holds it."""
    return [int(v) for v in value] if isinstance(value, list) else value


# --- every recipe loads and passes the start-up checks --------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_every_recipe_loads_and_passes_the_start_up_checks(recipe, shared_fs):
    config, _ = driver.parse_args(["--config", str(recipe), *on_shared_fs(recipe, shared_fs)])
    check_backend_config(config)  # Megatron: the layout against the model's config.json
    check_engine_config(config)  # SGLang: flags against sglang 0.5.23's table
    reward = load_reward_fn(config.rollout.reward)
    train, held_out = load_train_and_eval(config.data, config.seed)
    assert train and (held_out or config.data.eval_data is None)
    assert reward(prompt=train[0].text, response="\\boxed{0}", label=train[0].label) in (0, 1)
    if config.rollout.environment:  # what each rollout actor loads at its start
        load_environment(config.rollout.environment)
        for name, path in config.rollout.tools.items():
            load_tool_fn(name, path)
    if config.checkpoint.load:
        assert checkpoint_to_load(config.checkpoint.load) == Path(config.checkpoint.load)


@pytest.mark.parametrize("recipe", CLUSTER_RECIPES, ids=lambda path: path.name)
def test_cluster_recipes_keep_their_files_on_the_shared_file_system(recipe):
    """Relative paths would resolve on each node's own disk, not where the others look."""
    config = load_config(recipe)
    paths = {key: dotted(config, key) for key in PATH_KEYS if dotted(config, key) is not None}
    assert {"model.hf_checkpoint", "data.prompt_data", "logging.output_dir"} <= set(paths)
    for key, path in paths.items():
        assert path.startswith(SHARED_ROOTS), f"{key}={path}"
    assert config.rollout.reward == "rl.rewards:math_reward"
    assert (config.train.backend, config.rollout.engine) == ("megatron", "sglang")
    assert config.model.dtype == "bfloat16"
    assert config.placement.colocate and config.placement.use_gpus == "yes"


# --- the dry run on a fake Ray cluster of 8-GPU nodes ---------------------------------------


class FakeCluster:
    """One `ray.cluster_utils.Cluster` of 8-GPU nodes, connected to this process; grown (or,
    when asked for fewer nodes, restarted) to the size a test asks for."""

    def __init__(self) -> None:
        self.cluster = None
        self.starts = 0

    def with_nodes(self, count: int):
        from ray.cluster_utils import Cluster

        if self.cluster is not None and len(self.cluster.list_all_nodes()) > count:
            self.close()
        if self.cluster is None:
            self.cluster = Cluster(
                initialize_head=True, head_node_args={**NODE, "include_dashboard": False}
            )
            self.starts += 1
            ray.init(address=self.cluster.address, log_to_driver=False)
        for _ in range(count - len(self.cluster.list_all_nodes())):
            self.cluster.add_node(wait=False, **NODE)  # the new nodes start together
        self.cluster.wait_for_nodes(timeout=120)  # generous: CI machines are small and busy
        assert len(read_cluster_shape().nodes) == count
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            ray.shutdown()
            self.cluster.shutdown()
            self.cluster = None


@pytest.fixture(scope="module")
def fake_cluster():
    with pytest.MonkeyPatch.context() as monkeypatch:
        # Under `uv run`, Ray 2.60 would rebuild this environment for every worker.
        import ray._private.ray_constants as ray_constants

        monkeypatch.setattr(ray_constants, "RAY_ENABLE_UV_RUN_RUNTIME_ENV", False)
        clusters = FakeCluster()
        try:
            yield clusters
        finally:
            clusters.close()


# One-node recipes first: the module's cluster then starts once and grows once.
BY_NODES = sorted(CLUSTER_RECIPES, key=lambda path: (nodes_needed(path), path.name))


@pytest.mark.sglang
@pytest.mark.parametrize("recipe", BY_NODES, ids=lambda path: path.name)
def test_dry_run_on_a_fake_ray_cluster(recipe, shared_fs, fake_cluster, monkeypatch, capsys):
    local = on_shared_fs(recipe, shared_fs)
    config, _ = driver.parse_args(["--config", str(recipe), *local])
    nodes = nodes_needed(recipe)
    cluster = fake_cluster.with_nodes(nodes)
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # the dry run plans on that cluster

    assert driver.main(["--config", str(recipe), *local, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"placement: {gpus_needed(config)} GPUs on {nodes} node(s), colocated" in out

    shape = read_cluster_shape()
    layout = plan_layout(shape, config)  # the plan the dry run printed
    assert [node.node_id for node in layout.nodes] == [node.node_id for node in shape.nodes]
    for node in layout.nodes:
        assert node.node_id[:12] in out

    # Training ranks fill the nodes in order; each tensor-parallel group is inside one node.
    tensor = config.train.parallel.tensor
    slots = layout.train_slots
    assert [(s.node_index, s.gpu_index) for s in slots] == [
        (rank // GPUS_PER_NODE, rank % GPUS_PER_NODE) for rank in range(len(slots))
    ]
    for first in range(0, len(slots), tensor):
        group = slots[first : first + tensor]
        assert len({s.node_index for s in group}) == 1, f"TP group of rank {first}"

    # One engine on the trainers' GPUs (colocated), one server per node it spans.
    (engine_slots,) = layout.engine_slots
    assert engine_slots == slots
    spans = layout.engine_spans(0)
    assert [span.node_index for span in spans] == list(range(nodes))
    assert all(span.base_gpu_id == 0 and len(span.slots) == GPUS_PER_NODE for span in spans)
    head = layout.nodes[spans[0].node_index]
    for rank, span in enumerate(spans):
        assert f"engine 0 node_rank {rank} on {layout.nodes[span.node_index].address}:" in out

    # Every printed command line, through sglang's own parser: the placement's flags and the
    # recipe's server_args.
    commands = printed_commands(out)
    assert len(commands) == nodes
    server_args = config.rollout.sglang.server_args
    for rank, argv in enumerate(commands):
        args = sglang_resolve(argv)
        assert args.model_path == config.model.hf_checkpoint
        assert (args.tp_size, args.dtype) == (config.rollout.gpus_per_engine, "bfloat16")
        assert (args.nnodes, args.node_rank, args.base_gpu_id) == (nodes, rank, 0)
        dp_attention = int(server_args.get("attn-dp-size", 1)) > 1
        assert args.dist_init_addr == (
            f"{head.address}:20000" if nodes > 1 or dp_attention else None
        )
        assert args.enable_memory_saver  # colocated: memory released while trainers step
        for name, value in server_args.items():
            assert getattr(args, name.replace("-", "_")) == sglang_value(value), name
        assert args.mem_fraction_static == 0.7
        if nodes == 1:  # the seed's 8-GPU engine: EP8, CUDA graphs for 1 2 4 8 $(seq 16 8 256)
            assert args.ep_size == 8
            assert args.cuda_graph_bs_decode == [1, 2, 4, 8, *range(16, 257, 8)]
        else:  # the seed's 24-GPU engine: 128 + 16 experts = 6 per GPU
            assert (args.ep_size, args.attn_dp_size, args.moe_dense_tp_size) == (24, 3, 1)
            assert args.enable_dp_lm_head and args.ep_num_redundant_experts == 16
    assert fake_cluster.starts == 1  # grown from one node, never restarted


@pytest.mark.sglang
def test_dry_run_of_the_one_step_off_recipe(shared_fs, fake_cluster, monkeypatch, capsys):
    """Trainers on the first two nodes, the engine alone on the third, weights over NCCL,
    generating one step ahead; run after the colocated recipes, on their 3-node cluster."""
    local = on_shared_fs(R24_ASYNC, shared_fs)
    config, _ = driver.parse_args(["--config", str(R24_ASYNC), *local])
    assert (config.algorithm.max_staleness, config.rollout.partial) == (1, "finish")
    cluster = fake_cluster.with_nodes(3)
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    assert driver.main(["--config", str(R24_ASYNC), *local, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "placement: 24 GPUs on 3 node(s)" in out

    layout = plan_layout(read_cluster_shape(), config)
    assert {s.node_index for s in layout.train_slots} == {0, 1}
    (engine_slots,) = layout.engine_slots
    assert {s.node_index for s in engine_slots} == {2} and len(engine_slots) == 8
    assert transport_backend(config.weight_sync, layout, "sglang") == "nccl"

    (argv,) = printed_commands(out)
    args = sglang_resolve(argv)
    assert (args.tp_size, args.ep_size, args.attn_dp_size, args.nnodes) == (8, 8, 8, 1)
    assert not args.enable_memory_saver  # the engine's GPUs are its own
    assert args.mem_fraction_static == 0.8


# --- the seed's arrays give the recipes' values ---------------------------------------------


def seed_keys(argv: list[str]) -> set[str]:
    """The config keys that seed flags `argv` set (every --sglang-* one: the server_args)."""
    flags = [w for w in argv if w.startswith("--")]
    assert all(w in SEED_FLAGS or w.startswith(CLI_PREFIX) for w in flags), flags
    keys = {SEED_FLAGS[w].key for w in flags if w in SEED_FLAGS}  # (no keyed-value flags)
    if any(w.startswith(CLI_PREFIX) for w in flags):
        keys.add("rollout.sglang.server_args")
    return keys


def without_keys(values: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """Recipe `values` without `keys` (dotted), which then take their defaults."""
    for key in keys:
        *sections, name = key.split(".")
        section = functools.reduce(lambda d, s: d.get(s, {}), sections, values)
        section.pop(name, None)
    return values


def launch_args(config) -> list:
    """sglang's resolved settings of every server of engine 0, planned on 8-GPU nodes."""
    resolved = resolve_server_args(config, read_num_experts(config))
    nodes = math.ceil(gpus_needed(config) / GPUS_PER_NODE)
    layout = plan_layout(synthetic_cluster(nodes, GPUS_PER_NODE, 64.0), config)
    launches = server_launches(config, layout, 0, resolved, port=30000, dist_init_port=20000)
    return [resolved_fields(list(launch.argv)) for launch in launches]


def as_flags(args: dict[str, Any]) -> dict[str, list[str]]:
    """{flag: its launch_server words}: how a resolved value reaches the server."""
    return {name: as_argv({name: value}) for name, value in args.items()}


@pytest.mark.sglang
@pytest.mark.parametrize(
    ("recipe", "seed_args"),
    [
        (R8, OPTIMIZER_ARGS + PERF_ARGS + SGLANG_ARGS),
        (R8_DP, OPTIMIZER_ARGS + PERF_ARGS + SGLANG_ARGS + DP_ATTENTION_ARGS),
        (R24, PERF_ARGS + SGLANG_ARGS_24),  # no CPU Adam on several nodes
        (R_FP8, OPTIMIZER_ARGS + PERF_ARGS + SGLANG_ARGS + FP8_ARGS),
    ],
    ids=lambda value: value.name if isinstance(value, Path) else "",
)
def test_seed_arrays_give_the_recipes_values(recipe, seed_args, shared_fs, tmp_path):
    """The recipe stripped of what the arrays set, plus the arrays, is the recipe."""
    keys = seed_keys(seed_args)
    # The seed's /root/X is the recipes' /models/X, re-rooted like every recipe path.
    seed_args = [
        str(shared_fs / "models" / w.removeprefix("/root/")) if w.startswith("/root/") else w
        for w in seed_args
    ]
    base = tmp_path / recipe.name
    base.write_text(yaml.safe_dump(without_keys(raw_recipe(recipe), keys)))
    local = on_shared_fs(recipe, shared_fs, skip=keys)  # what the arrays set, they set alone
    stripped, _ = driver.parse_args(["--config", str(base), *local])
    seeded, _ = driver.parse_args(["--config", str(base), *local, *seed_args])
    own, _ = driver.parse_args(["--config", str(recipe), *on_shared_fs(recipe, shared_fs)])

    def without_server_args(config) -> dict[str, Any]:
        values = to_dict(config)
        values["rollout"]["sglang"].pop("server_args")
        return values

    assert without_server_args(seeded) == without_server_args(own)
    assert to_dict(stripped) != to_dict(own)  # the arrays carry the settings compared
    seeded_resolved = resolve_server_args(seeded, read_num_experts(seeded))
    own_resolved = resolve_server_args(own, read_num_experts(own))
    assert as_flags(seeded_resolved.args) == as_flags(own_resolved.args)
    assert any("enable-ep-moe" in note for note in seeded_resolved.notes)  # translated
    assert launch_args(seeded) == launch_args(own)


# --- recipes that repeat the 8-GPU one differ only where they say ---------------------------


def differences(a: Any, b: Any, prefix: str = "") -> set[str]:
    """Dotted keys (into nested dicts) whose values differ between `a` and `b`."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return set() if a == b else {prefix.rstrip(".")}
    found = set()
    for key in a.keys() | b.keys():
        found |= differences(a.get(key), b.get(key), f"{prefix}{key}.")
    return found


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        (
            R8_DP,
            {
                "rollout.sglang.server_args.attn-dp-size",
                "checkpoint.save",
                "logging.output_dir",
            },
        ),
        (
            R_FP8,
            {
                "model.hf_checkpoint",
                "algorithm.old_log_probs",
                "checkpoint.load",
                "checkpoint.save",
                "logging.output_dir",
            },
        ),
        (
            R_TOOL,
            {
                "data.prompt_data",
                "data.eval_data",
                "rollout.reward",
                "rollout.environment",
                "rollout.tools.python",
                "rollout.max_tool_calls",
                "rollout.max_episode_tokens",
                "rollout.tool_workers",
                "rollout.tool_timeout_s",
                "rollout.tool_memory_mb",
                "checkpoint.save",
                "logging.output_dir",
            },
        ),
    ],
    ids=lambda value: value.name if isinstance(value, Path) else "",
)
def test_copies_of_the_8gpu_recipe_differ_only_where_they_say(recipe, expected):
    assert differences(to_dict(load_config(R8)), to_dict(load_config(recipe))) == expected


@pytest.mark.sglang
def test_fp8_rollout_engines_serve_fp8_while_megatron_loads_the_bf16_conversion(shared_fs):
    """ "bf16 训练 fp8 推理" as the recipe runs it: the engine's --model-path is the FP8
    checkpoint, whose config.json switches the weight sync to fp8 in 128 x 128 blocks and turns
    TIS on (ratio against the trainer's recomputed log-probs); Megatron's checkpoint.load is
    the torch_dist conversion of the bf16 one (the converter refuses the FP8 checkpoint, as the
    seed warns)."""
    config, _ = driver.parse_args(["--config", str(R_FP8), *on_shared_fs(R_FP8, shared_fs)])
    fp8, bf16 = Path(config.model.hf_checkpoint), shared_fs / "models" / "Qwen3-30B-A3B"
    assert rollout_fp8_format(config.model).block_size == (128, 128)
    settings = LossSettings.of(config)
    assert settings.tis and settings.old_log_probs == "recompute"
    assert settings.tis_cap == 2.0
    (args,) = launch_args(config)
    assert args["model_path"] == str(fp8)
    assert Path(config.checkpoint.load) == shared_fs / "models" / "Qwen3-30B-A3B_torch_dist"
    with pytest.raises(UserError, match="quant_method=fp8"):
        read_hf_config(fp8)  # tools/convert_hf_to_torch_dist.py's first step
    assert read_hf_config(bf16).num_experts == 128
