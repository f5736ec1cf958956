"""Set up megatron-core's parallel state and build the GPT model of a Hugging Face config."""

from typing import Any

import torch

from config.schema import ParallelConfig
from training.megatron.layers import decoder_block_spec
from training.megatron.model_config import model_shape, transformer_config
from training.megatron.routing_replay import check_replayable


def init_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """megatron-core's process groups over the already-initialised default group."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_gpt_model(
    hf_config: Any,
    parallel: ParallelConfig,
    dtype: str,
    device: torch.device,
    layer_spec: str = "torch",
    routing_replay: bool = False,
    recompute: dict[str, Any] | None = None,
):
    """This rank's part of the model, uninitialised (weights are loaded from a checkpoint).
    `layer_spec` picks the expert and attention modules (`layers.LAYER_SPECS`);
    `routing_replay` gives each router megatron-core's `RouterReplay`; `recompute` the
    activation-recompute fields (`model_config.recompute_settings`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(hf_config, parallel, dtype, recompute)
    config.moe_enable_routing_replay = routing_replay
    if routing_replay:
        check_replayable(config)
    config.use_cpu_initialization = device.type == "cpu"
    config.perform_initialization = False
    shape = model_shape(hf_config)
    model = GPTModel(
        config,
        decoder_block_spec(config, layer_spec),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(shape.rotary_base),
    )
    return model.to(device)
