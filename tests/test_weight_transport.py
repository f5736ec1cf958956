"""Which transport a layout's weight sync takes, and which training rank serves each engine's
CUDA IPC handles when engines share the trainers' GPUs (plans of fake clusters, no Ray)."""

import pytest

from actors.weight_sync import handle_sources, transport_backend
from config import UserError, load_config
from placement.cluster import synthetic_cluster
from placement.planner import plan_layout


def plan(nodes: int, gpus: int, **overrides):
    config = load_config(None, {"placement.cpus_per_bundle": "1", **overrides})
    return config, plan_layout(synthetic_cluster(nodes, gpus, 64.0), config)


TRANSFORMERS_1X8 = {
    "train.num_workers": "8",
    "rollout.num_engines": "8",
    "placement.colocate": "true",
}


def test_colocated_transformers_engines_open_the_handles_of_their_gpu_mate():
    config, layout = plan(1, 8, **TRANSFORMERS_1X8)
    assert transport_backend(config.weight_sync, layout, "transformers") == "ipc"
    # Each engine is a Ray actor that sees only its own GPU: training rank e shares GPU e.
    assert handle_sources(layout, "transformers") == [{0: e} for e in range(8)]


def test_an_sglang_engine_opens_the_first_training_rank_of_each_of_its_nodes():
    overrides = {"train.num_workers": "24", "rollout.num_engines": "1"}
    overrides |= {"rollout.gpus_per_engine": "24", "placement.colocate": "true"}
    config, layout = plan(3, 8, **overrides)
    assert transport_backend(config.weight_sync, layout, "sglang") == "ipc"
    assert handle_sources(layout, "sglang") == [{0: 0, 1: 8, 2: 16}]


def test_engines_on_their_own_gpus_take_nccl_and_cpus_take_gloo():
    config, layout = plan(1, 8, **{"train.num_workers": "4", "rollout.num_engines": "4"})
    assert transport_backend(config.weight_sync, layout, "transformers") == "nccl"
    config, layout = plan(1, 0, **TRANSFORMERS_1X8)
    assert transport_backend(config.weight_sync, layout, "transformers") == "gloo"


def test_gloo_stays_available_for_colocated_gpus_and_ipc_needs_them():
    config, layout = plan(1, 8, **TRANSFORMERS_1X8, **{"weight_sync.backend": "gloo"})
    assert transport_backend(config.weight_sync, layout, "transformers") == "gloo"
    config, layout = plan(1, 0, **TRANSFORMERS_1X8, **{"weight_sync.backend": "ipc"})
    with pytest.raises(UserError, match=r"needs placement\.colocate=true and GPUs"):
        transport_backend(config.weight_sync, layout, "transformers")
