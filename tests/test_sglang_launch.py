"""The SGLang command lines Sluice generates, resolved by sglang 0.5.23's own code.

Each case runs the user's path: the driver's command line (seed flags included) -> the config
-> the placement plan of a 1 x 8 or 3 x 8 cluster -> every engine node's `launch_server`
arguments -> what `launch_server` makes of them before it starts a process: SGLang's parser
and its resolution pipeline (`tests/sglang_args.py`).
"""

import json
import warnings
from pathlib import Path

import pytest

import driver
from config.errors import UserError
from inference.sglang.engine import free_port_block
from inference.sglang.flag_table import TABLE_PATH, read_sglang_parser
from inference.sglang.launch import (
    DIST_INIT_PORTS,
    describe_engines,
    resolve_server_args,
    server_launches,
)
from placement.cluster import synthetic_cluster
from placement.planner import plan_layout
from tests.sglang_args import resolved as sglang_resolve
from tests.sglang_args import server_args as sglang_server_args

pytestmark = pytest.mark.sglang

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sglang.srt.server_args import PortArgs

CUDA_GRAPH_BS = ["1", "2", "4", "8", *map(str, range(16, 257, 8))]
SEED_8_GPU = [  # the seed's SGLANG_ARGS for one node, as written there
    "--rollout-num-gpus-per-engine", "8", "--sglang-mem-fraction-static", "0.7",
    "--sglang-enable-ep-moe", "--sglang-cuda-graph-bs", *CUDA_GRAPH_BS,
]  # fmt: skip
SEED_24_GPU = [  # the seed's SGLANG_ARGS for three nodes
    "--rollout-num-gpus-per-engine", "24", "--sglang-mem-fraction-static", "0.7",
    "--sglang-enable-ep-moe", "--sglang-enable-dp-attention", "--sglang-dp-size", "3",
    "--sglang-moe-dense-tp-size", "1", "--sglang-enable-dp-lm-head",
    "--sglang-ep-num-redundant-experts", "16",
]  # fmt: skip


@pytest.fixture
def qwen3_30b(tmp_path):
    """A model directory with Qwen3-30B-A3B's config.json (128 routed experts, 8 active)."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        vocab_size=151936,
        architectures=["Qwen3MoeForCausalLM"],
    )
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def launches_for(
    argv: list[str], nodes: int, gpus: int = 8, engine: int = 0, dist_init_port: int = 20000
):
    config, _ = driver.parse_args(argv)
    layout = plan_layout(synthetic_cluster(nodes, gpus, 64.0), config)
    resolved = resolve_server_args(config, _num_experts(config))
    ports = {"port": 30000 + engine, "dist_init_port": dist_init_port + engine}
    return config, layout, resolved, server_launches(config, layout, engine, resolved, **ports)


def _num_experts(config):
    from inference.sglang.launch import read_num_experts

    return read_num_experts(config)


def colocated(model: str, workers: int) -> list[str]:
    return [
        "--rollout.engine", "sglang", "--model.hf_checkpoint", model,
        "--placement.colocate", "true", "--train.num_workers", str(workers),
        "--rollout.batch_size", "256", "--rollout.num_engines", "1",
    ]  # fmt: skip


def test_flag_table_is_the_installed_sglangs():
    """server_flags.json (what the driver checks flags against) equals SGLang's parser."""
    assert json.loads(TABLE_PATH.read_text()) == read_sglang_parser()


def test_seed_8_gpu_args_parse_with_expert_parallelism(qwen3_30b):
    *_, resolved, launches = launches_for([*colocated(qwen3_30b, 8), *SEED_8_GPU], 1)
    assert len(launches) == 1
    args = sglang_resolve(list(launches[0].argv))
    assert args.model_path == qwen3_30b
    assert (args.tp_size, args.ep_size, args.attn_dp_size) == (8, 8, 1)
    assert args.mem_fraction_static == 0.7
    assert args.cuda_graph_bs_decode == [int(b) for b in CUDA_GRAPH_BS]
    assert args.ep_num_redundant_experts == 0  # 128 experts divide over 8 GPUs
    assert (args.nnodes, args.node_rank, args.base_gpu_id) == (1, 0, 0)
    assert args.enable_memory_saver  # colocated: released while the trainers step
    assert launches[0].visible_devices == "0,1,2,3,4,5,6,7"
    assert args.dist_init_addr is None  # one node, no DP attention: SGLang uses IPC sockets
    assert any("enable-ep-moe" in note and "--ep-size 8" in note for note in resolved.notes)
    assert any("cuda-graph-bs-decode" in note for note in resolved.notes)


def test_seed_8_gpu_with_dp_attention(qwen3_30b):
    argv = [
        *colocated(qwen3_30b, 8), *SEED_8_GPU,
        "--sglang-enable-dp-attention", "--sglang-dp-size", "8",
    ]  # fmt: skip
    _, _, resolved, launches = launches_for(argv, 1)
    args = sglang_resolve(list(launches[0].argv))
    assert (args.tp_size, args.ep_size, args.attn_dp_size, args.dp_size) == (8, 8, 8, 1)
    assert args.chunked_prefill_size == 512  # SGLang's resolution ran its DP-attention rule
    assert any("--attn-dp-size 8" in note for note in resolved.notes)


def test_dp_attention_binds_only_the_reserved_block_of_ports(qwen3_30b):
    """With DP attention SGLang opens TCP sockets on ports derived from `--dist-init-addr`
    (from the HTTP port + 233 when none is given, which another engine may hold): a one-node
    engine gets `--dist-init-addr` too, at the start of a block of free ports, and SGLang's own
    `PortArgs` lands every derived port inside that block."""
    argv = [*colocated(qwen3_30b, 8), *SEED_8_GPU, "--sglang-attn-dp-size", "8"]
    first = free_port_block(DIST_INIT_PORTS)
    *_, launches = launches_for(argv, 1, dist_init_port=first)
    server_args = sglang_server_args(list(launches[0].argv))
    assert server_args.dist_init_addr == f"10.0.0.1:{first}"
    ports = PortArgs.init_new(server_args)  # also checks that each derived port is free
    derived = [
        ports.tokenizer_ipc_name, ports.scheduler_input_ipc_name, ports.detokenizer_ipc_name,
        ports.rpc_ipc_name, ports.metrics_ipc_name,
    ]  # fmt: skip
    numbers = {int(name.rsplit(":", 1)[1]) for name in derived}
    assert numbers <= set(range(first + 1, first + DIST_INIT_PORTS)), (first, numbers)


def test_dp_attention_switch_with_the_new_width_flag_is_valid(qwen3_30b):
    """`--enable-dp-attention --attn-dp-size 8` is valid in sglang 0.5.23 (the switch is
    implied by the width): accepted, not refused with the advice to pass what was passed."""
    argv = [
        *colocated(qwen3_30b, 8), *SEED_8_GPU,
        "--sglang-enable-dp-attention", "--sglang-attn-dp-size", "8",
    ]  # fmt: skip
    _, _, resolved, launches = launches_for(argv, 1)
    args = sglang_resolve(list(launches[0].argv))
    assert (args.attn_dp_size, args.dp_size) == (8, 1)
    assert any("implied by --sglang-attn-dp-size" in note for note in resolved.notes)


def _with_stored_dtype(directory: str, dtype: str | None) -> str:
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if dtype is not None:
        config["dtype"] = dtype
    path.write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(("stored", "expected"), [("bfloat16", "bfloat16"), (None, "auto")])
def test_engine_dtype_is_the_checkpoints_not_the_trainers_default(qwen3_30b, stored, expected):
    """model.dtype defaults to float32 (the CPU's); the engine serves what the checkpoint
    stores, or lets SGLang read it at launch ("auto")."""
    model = _with_stored_dtype(qwen3_30b, stored)
    config, _, resolved, launches = launches_for([*colocated(model, 8), *SEED_8_GPU], 1)
    assert config.model.dtype == "float32"
    assert sglang_resolve(list(launches[0].argv)).dtype == expected
    assert any(note.startswith(f"--dtype {expected}") for note in resolved.notes)
    assert any("SGLang casts them" in note for note in resolved.notes) == (stored is not None)


def test_float32_for_sglang_is_noted(qwen3_30b):
    argv = [*colocated(qwen3_30b, 8), *SEED_8_GPU, "--sglang-dtype", "float32"]
    _, _, resolved, launches = launches_for(argv, 1)
    assert sglang_resolve(list(launches[0].argv)).dtype == "float32"
    assert any("float32 at a fraction of bf16's speed" in note for note in resolved.notes)


def test_seed_24_gpu_args_give_three_nodes_and_redundant_experts(qwen3_30b):
    *_, launches = launches_for([*colocated(qwen3_30b, 24), *SEED_24_GPU], 3)
    assert [launch.node_rank for launch in launches] == [0, 1, 2]
    assert [launch.address for launch in launches] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    for rank, launch in enumerate(launches):
        args = sglang_resolve(list(launch.argv))
        assert (args.nnodes, args.node_rank) == (3, rank)
        assert args.dist_init_addr == "10.0.0.1:20000"  # the engine's first node, every rank
        assert args.base_gpu_id == 0 and launch.visible_devices == "0,1,2,3,4,5,6,7"
        assert (args.tp_size, args.ep_size, args.attn_dp_size) == (24, 24, 3)
        assert args.moe_dense_tp_size == 1
        assert args.enable_dp_lm_head
        assert args.ep_num_redundant_experts == 16  # the seed's value: (128 + 16) / 24 = 6
        assert args.mem_fraction_static == 0.7
        # The copies serve tokens only when placed: EPLB on, SGLang's derived settings with it.
        assert args.enable_eplb and args.expert_distribution_recorder_mode == "stat"
        assert args.ep_dispatch_algorithm is not None


def test_redundant_experts_are_computed_when_not_given(qwen3_30b):
    argv = [*colocated(qwen3_30b, 24), *SEED_24_GPU]
    argv = argv[: argv.index("--sglang-ep-num-redundant-experts")]
    _, _, resolved, launches = launches_for(argv, 3)
    assert sglang_resolve(list(launches[0].argv)).ep_num_redundant_experts == 16
    assert any("adding 16 redundant experts" in n and "6 per GPU" in n for n in resolved.notes)
    assert any(n.startswith("--sglang-enable-eplb added: the 16 redundant") for n in resolved.notes)


@pytest.mark.parametrize(
    ("extra", "eplb", "note"),
    [
        (["--sglang-enable-eplb", "false"], False, "serve no tokens"),
        (["--sglang-init-expert-location", "/x/location.json"], False, None),
        (["--sglang-enable-eplb"], True, None),
    ],
)
def test_redundant_experts_are_placed_unless_the_user_says_otherwise(qwen3_30b, extra, eplb, note):
    argv = [*colocated(qwen3_30b, 24), *SEED_24_GPU, *extra]
    config, _ = driver.parse_args(argv)
    resolved = resolve_server_args(config, 128)
    assert resolved.args.get("enable-eplb", False) is eplb
    eplb_notes = [n for n in resolved.notes if "enable-eplb" in n]
    assert (note is None and not eplb_notes) or any(note in n for n in eplb_notes), eplb_notes


def test_a_wrong_redundant_expert_count_names_the_valid_ones(qwen3_30b):
    argv = [*colocated(qwen3_30b, 24), *SEED_24_GPU[:-1], "10"]
    with pytest.raises(UserError, match=r"138 do not divide over ep-size 24; use 16 \(6 per"):
        launches_for(argv, 3)


def test_disaggregated_engines_get_their_gpus_after_the_trainers(qwen3_30b):
    argv = [
        "--rollout.engine", "sglang", "--model.hf_checkpoint", qwen3_30b,
        "--train.num_workers", "4", "--rollout.num_engines", "2",
        "--rollout.gpus_per_engine", "2", "--sglang-ep-size", "2",
    ]  # fmt: skip
    for engine, gpus in ((0, "4,5"), (1, "6,7")):
        *_, launches = launches_for(argv, 1, engine=engine)
        args = sglang_resolve(list(launches[0].argv))
        assert launches[0].visible_devices == gpus
        assert (args.base_gpu_id, args.tp_size, args.ep_size) == (0, 2, 2)
        assert args.port == 30000 + engine
        assert not args.enable_memory_saver
        assert args.random_seed == 1234 + engine  # engines never sample in lockstep


def test_the_server_sees_exactly_the_gpus_ray_gave_its_bundles(qwen3_30b):
    """Ray's GPU ids (the placement probe's) are what CUDA_VISIBLE_DEVICES means on the node,
    also when they are not consecutive or the raylet runs under a narrowed
    CUDA_VISIBLE_DEVICES; `range(node GPUs)` with a base GPU id would pick other GPUs."""
    argv = [
        "--rollout.engine", "sglang", "--model.hf_checkpoint", qwen3_30b,
        "--train.num_workers", "2", "--rollout.num_engines", "1",
        "--rollout.gpus_per_engine", "2",
    ]  # fmt: skip
    config, _ = driver.parse_args(argv)
    layout = plan_layout(synthetic_cluster(1, 4, 64.0), config)
    resolved = resolve_server_args(config, 128)
    (launch,) = server_launches(
        config, layout, 0, resolved, port=30000, dist_init_port=20000, gpu_ids=[[5, 7]]
    )
    assert launch.visible_devices == "5,7"
    assert launch.command.startswith("CUDA_VISIBLE_DEVICES=5,7 python -m sglang.launch_server")
    assert sglang_resolve(list(launch.argv)).base_gpu_id == 0  # cuda:0 and cuda:1 of those


def test_every_value_kind_passes_through_to_sglang(qwen3_30b):
    """A switch, a negatable switch, a choice, an int, a float and a list, as typed."""
    argv = [
        *colocated(qwen3_30b, 8), "--rollout.gpus_per_engine", "8",
        "--sglang-enable-metrics", "--sglang-no-enable-tf32-matmul",
        "--sglang-dtype", "bfloat16", "--sglang-chunked-prefill-size", "4096",
        "--sglang-mem_fraction_static=0.6", "--sglang-cuda-graph-bs-decode", "1", "2",
    ]  # fmt: skip
    *_, launches = launches_for(argv, 1)
    args = sglang_resolve(list(launches[0].argv))
    assert args.enable_metrics and args.enable_tf32_matmul is False
    assert (args.dtype, args.chunked_prefill_size) == ("bfloat16", 4096)
    assert (args.mem_fraction_static, args.cuda_graph_bs_decode) == (0.6, [1, 2])


def test_recipe_server_args_and_command_line_flags_merge(qwen3_30b, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "rollout:\n  engine: sglang\n  sglang:\n    server_args:\n"
        "      mem-fraction-static: 0.7\n      cuda_graph_bs_decode: [1, 2, 4]\n"
    )
    config, _ = driver.parse_args(
        ["--config", str(recipe), "--model.hf_checkpoint", qwen3_30b,
         "--sglang-mem-fraction-static", "0.5"]
    )  # fmt: skip
    assert config.rollout.sglang.server_args == {
        "mem-fraction-static": "0.5",
        "cuda_graph_bs_decode": [1, 2, 4],
    }
    resolved = resolve_server_args(config, 128)
    assert resolved.args["mem-fraction-static"] == "0.5"
    assert resolved.args["cuda-graph-bs-decode"] == [1, 2, 4]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sglang-mem-fraction-statik", "0.7"], "nearest: --sglang-mem-fraction-static"),
        (["--sglang-redundant-experts", "16"], "--sglang-ep-num-redundant-experts"),
        (["--sglang-tp-size", "8"], "rollout.gpus_per_engine"),
        (["--sglang-port", "30000"], "placement group"),
        (["--sglang-dp-size", "2"], "rollout.num_engines"),
        (["--sglang-enable-dp-attention"], "--sglang-attn-dp-size N"),
        (["--sglang-ep-size", "3"], "does not divide the engine's 8 GPUs"),
        (["--sglang-dtype", "fp7"], "'fp7' is not one of"),
        (["--sglang-chunked-prefill-size", "lots"], "'lots' is not an int"),
        (["--sglang-mem-fraction-static"], "needs a value"),
        (["--sglang-cuda-graph-bs", "1", "--sglang-cuda-graph-bs-decode", "2"], "only one"),
        (
            ["--use-rollout-routing-replay", "--sglang-enable-return-routed-experts", "false"],
            "enable-return-routed-experts false: algorithm.routing_replay needs",
        ),
    ],
)
def test_bad_sglang_flags_are_errors_naming_the_fix(capsys, qwen3_30b, argv, message):
    base = [*colocated(qwen3_30b, 8), "--rollout.gpus_per_engine", "8", "--dry-run"]
    assert driver.main([*base, *argv, "--cluster", "1x8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_builtin_model_and_verify_are_refused_with_sglang():
    with pytest.raises(UserError, match="Hugging Face model directory"):
        driver.dry_run(driver.parse_args(["--rollout.engine", "sglang"])[0], "1x8")


def test_dry_run_shows_every_engine_nodes_command(capsys, qwen3_30b):
    argv = [*colocated(qwen3_30b, 24), *SEED_24_GPU, "--dry-run", "--cluster", "3x8"]
    assert driver.main(argv) == 0
    out = capsys.readouterr().out
    for rank, address in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3"]):
        assert f"engine 0 node_rank {rank} on {address}:" in out
    assert out.count("python -m sglang.launch_server --model-path") == 3
    assert "--dist-init-addr 10.0.0.1:DIST_PORT" in out
    assert "note: --sglang-enable-ep-moe is the seed's SGLang; passing --ep-size 24" in out


def test_dry_run_explains_unknown_expert_count(capsys):
    argv = ["--rollout.engine", "sglang", "--model.hf_checkpoint", "/models/not-here",
            "--rollout.gpus_per_engine", "24", "--sglang-ep-size", "24",
            "--placement.colocate", "true", "--train.num_workers", "24",
            "--rollout.num_engines", "1", "--dry-run", "--cluster", "3x8"]  # fmt: skip
    assert driver.main(argv) == 0
    assert "redundant experts are computed at launch" in capsys.readouterr().out


def test_describe_engines_refuses_a_cpu_plan(qwen3_30b):
    config, _ = driver.parse_args([*colocated(qwen3_30b, 1), "--rollout.batch_size", "8"])
    layout = plan_layout(synthetic_cluster(1, 0, 8.0), config)
    with pytest.raises(UserError, match="runs on GPUs"):
        describe_engines(config, layout)


def test_routing_replay_makes_the_server_return_routed_experts(qwen3_30b):
    argv = [*colocated(qwen3_30b, 8), *SEED_8_GPU, "--use-rollout-routing-replay"]
    config, _, resolved, launches = launches_for(argv, 1)
    assert config.algorithm.routing_replay
    assert sglang_resolve(list(launches[0].argv)).enable_return_routed_experts
    assert any("enable-return-routed-experts added" in note for note in resolved.notes)
    *_, off = launches_for([*colocated(qwen3_30b, 8), *SEED_8_GPU], 1)
    assert not sglang_resolve(list(off[0].argv)).enable_return_routed_experts
