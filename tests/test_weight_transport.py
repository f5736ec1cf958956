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
    assert handle_sources(layout) == [[e] for e in range(8)]


def test_every_sglang_rank_opens_a_buffer_on_its_own_gpu():
    """Entry tp_rank of each engine is the training rank on that rank's (node, GPU): no SGLang
    rank reads another GPU's memory, also across nodes."""
    overrides = {"train.num_workers": "24", "rollout.num_engines": "1"}
    overrides |= {"rollout.gpus_per_engine": "24", "placement.colocate": "true"}
    config, layout = plan(3, 8, **overrides)
    assert transport_backend(config.weight_sync, layout, "sglang") == "ipc"
    (sources,) = handle_sources(layout)
    assert len(sources) == 24
    for tp_rank, rank in enumerate(sources):
        engine_slot, train_slot = layout.engine_slots[0][tp_rank], layout.train_slots[rank]
        assert (engine_slot.node_index, engine_slot.gpu_index) == (
            train_slot.node_index,
            train_slot.gpu_index,
        )
    assert sources == list(range(24))  # this plan puts both in (node, GPU) order

    overrides = {"train.num_workers": "8", "rollout.num_engines": "2"}
    overrides |= {"rollout.gpus_per_engine": "4", "placement.colocate": "true"}
    config, layout = plan(1, 8, **overrides)
    assert handle_sources(layout) == [[0, 1, 2, 3], [4, 5, 6, 7]]


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
