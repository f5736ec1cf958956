"""Run the Megatron backend under several parallel layouts in one torchrun world.

Started by tests/test_megatron.py as
    torchrun --nproc-per-node N tests/megatron/layouts.py OUT.json LAYOUT [LAYOUT ...]
with the CPU shim on PYTHONPATH. Each layout (e.g. `dp2`, `tp2-sp`, `ep2`, `pp2`,
`tp2-sp-etp2`, `dp2-bf16-cpuadam`; `-local` for megatron-core's local layer spec instead of
ours; `-r3` for routing replay of the rows' random routing; `-pack` for packed micro-batches;
`-full` / `-selective` for activation recompute; `-mb2` for two mini-batches and two epochs)
builds a fresh `MegatronBackend` over the same built-in model and the same rollout rows, runs
three training steps (`train` calls) and records, on rank 0: their losses, gradient norms,
optimizer steps and clip fractions, the
log-probs of the rows before training against the Hugging Face model's (forced to the same
routing under `-r3`, and also against its own routing then), whether the export
before training equals the Hugging Face tensors bit for bit, and (in OUT.json.LAYOUT.pt) the
exported weights after.
Paying megatron-core's import once for many layouts keeps the suite fast.
"""

import contextlib
import json
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from config.schema import ParallelConfig, SluiceConfig
from data.schema import build_rollout_batch
from models.checkpoint_format import checkpoint_tensors
from models.routing import RoutingShape, replay_routing
from models.tiny import build_tiny_model
from training.backend import TrainStats
from training.batch import pad_micro_batch, response_log_probs, rows_of

STEPS = 3
SEED = 7
ROUTING = RoutingShape(layers=2, top_k=2, num_experts=8)  # the built-in model's


def layout_config(name: str, world: int) -> SluiceConfig:
    config = SluiceConfig(seed=SEED)
    config.train.backend = "megatron"
    config.train.num_workers = world
    config.train.lr = 0.01
    # A gradient element that sums to ~0 would turn reduction-order rounding into a weight
    # change of up to 2 lr through Adam's g / (|g| + eps); eps 1e-4 bounds it (see the tests).
    config.train.adam_eps = 1e-4
    config.train.max_tokens_per_micro_batch = 40  # several micro-batches per step
    config.train.log_prob_chunk_tokens = 16  # several chunks per micro-batch (token_stats)
    p = ParallelConfig()
    for part in name.split("-"):
        if part.startswith("etp"):
            p.expert_tensor = int(part[3:])
        elif part.startswith("tp"):
            p.tensor = int(part[2:])
        elif part.startswith("ep"):
            p.expert = int(part[2:])
        elif part.startswith("pp"):
            p.pipeline = int(part[2:])
        elif part == "sp":
            p.sequence = True
        elif part == "cpuadam":
            config.train.optimizer_cpu_offload = True
            config.train.overlap_cpu_optimizer_d2h_h2d = True
            config.train.use_precision_aware_optimizer = True
        elif part == "overlap":  # CPU Adam's host step overlapped with the next forward
            config.train.overlap_cpu_adam_with_forward = True
        elif part == "bf16":
            config.model.dtype = "bfloat16"
        elif part == "kl":
            config.algorithm.kl_coef = 0.1
        elif part == "ent":  # the entropy bonus, whose gradient is vocabulary-parallel under TP
            config.algorithm.entropy_coef = 0.1
        elif part == "local":  # megatron-core's local spec instead of our torch spec
            config.train.layer_spec = "local"
        elif part == "r3":
            config.algorithm.routing_replay = True
        elif part == "pack":
            config.train.pack_sequences = True
        elif part in ("full", "selective"):  # activation recompute
            config.train.recompute_granularity = part
        elif part == "mb2":  # two mini-batches of 12 rows, two epochs: four optimizer steps
            config.train.global_batch_size = 12
            config.train.epochs = 2
            config.algorithm.old_log_probs = "recompute"
    config.train.parallel = p
    return config


def rollout_rows(num_rows: int = 24) -> list:
    """Fixed rows with varied prompt and response lengths, advantages of both signs."""
    rng = np.random.default_rng(0)
    columns = {k: [] for k in ("prompt_ids", "response_ids", "rollout_log_probs", "loss_mask")}
    for _ in range(num_rows):
        prompt = rng.integers(3, 14, rng.integers(3, 7)).tolist()
        response = rng.integers(3, 14, rng.integers(1, 5)).tolist()
        columns["prompt_ids"].append(prompt)
        columns["response_ids"].append(response)
        columns["rollout_log_probs"].append((-rng.random(len(response)) * 3).tolist())
        columns["loss_mask"].append([1] * len(response))
    columns["reward"] = rng.random(num_rows).tolist()
    columns["advantage"] = (rng.random(num_rows) - 0.5).tolist()
    columns["group_id"] = list(range(num_rows))
    columns["sample_index"] = [0] * num_rows
    columns["weight_version"] = [0] * num_rows
    columns["finish_reason"] = ["stop"] * num_rows
    columns["routed_experts"] = [  # read only by the `-r3` layouts
        random_routing(rng, len(p) + len(r) - 1)
        for p, r in zip(columns["prompt_ids"], columns["response_ids"], strict=True)
    ]
    batch = build_rollout_batch(columns)
    return [batch.slice(i, 4) for i in range(0, num_rows, 4)]


def random_routing(rng, positions: int) -> np.ndarray:
    """Distinct random experts per position and layer, as an engine would record them."""
    shape = (positions, ROUTING.layers, ROUTING.num_experts)
    ranked = np.argsort(rng.random(shape), axis=-1)
    return ranked[..., : ROUTING.top_k].astype(ROUTING.dtype)


def hf_log_probs(batches, replay: bool = False) -> list[torch.Tensor]:
    """The Hugging Face model's log-probs of the rows, replaying their routing if `replay`."""
    model = build_tiny_model(SEED).eval()
    rows = rows_of(batches, ROUTING if replay else None)
    indices = list(range(len(rows)))
    mb = pad_micro_batch(rows, indices)
    forced = replay_routing(model, mb.routed_experts) if replay else contextlib.nullcontext()
    with torch.no_grad(), forced:
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, mb.targets[..., None])[..., 0]
    return response_log_probs(lp, rows, indices)


def weights_path(out: str, layout: str) -> str:
    """Where rank 0 saves the exported weights after the last step of `layout`."""
    return f"{out}.{layout}.pt"


def run_layout(name: str, batches, out: str) -> dict:
    from megatron.core import parallel_state

    from training.megatron.backend import MegatronBackend

    world = dist.get_world_size()
    backend = MegatronBackend(layout_config(name, world), torch.device("cpu"))
    dp, dp_rank = backend.data_parallel_size, backend.data_parallel_rank
    share = batches[dp_rank::dp]
    normalizer = float(sum(b.column("loss_mask").flatten().to_numpy().sum() for b in batches))
    result: dict = {}
    log_probs = backend.compute_log_probs(share)
    replay = "r3" in name.split("-")
    if log_probs:  # on the last pipeline stage
        keys = (("logprob_abs_diff_mean", replay), ("free_logprob_abs_diff_mean", False))
        for key, forced in keys:
            reference = hf_log_probs(share, replay=forced)
            diffs = torch.cat([(a - b).abs() for a, b in zip(log_probs, reference, strict=True)])
            result[key] = diffs.mean().item()
        result["log_probs"] = [lp.tolist() for lp in log_probs]  # this rank's share's
    for key in ("logprob_abs_diff_mean", "free_logprob_abs_diff_mean"):
        gathered_diffs = [None] * world
        dist.all_gather_object(gathered_diffs, result.get(key))
        result[key] = max(d for d in gathered_diffs if d is not None)
    forwards = count_forwards(backend.model)
    opened = gate_host_steps(backend, gated_steps=STEPS - 1) if backend.host_adam else None
    keys = ("loss", "grad_norm", "optimizer_steps", "clip_fraction", "entropy", "policy_loss")
    recorded = {key: [] for key in keys}
    for _ in range(STEPS):
        stats = backend.train(share, normalizer)
        gathered = [None] * world
        dist.all_gather_object(gathered, stats)
        reduced = TrainStats.reduce(gathered)
        for key, values in recorded.items():
            values.append(reduced[f"train/{key}"])
    result["losses"] = recorded["loss"]
    result["grad_norms"] = recorded["grad_norm"]
    result["optimizer_steps"] = recorded["optimizer_steps"]
    result["clip_fractions"] = recorded["clip_fraction"]
    result["entropies"] = recorded["entropy"]
    result["policy_losses"] = recorded["policy_loss"]
    result["forwards"] = forwards  # of the training steps: recompute runs some twice
    if opened is not None:
        result["host_steps_opened_by_forward"] = [opened[n] for n in sorted(opened)]
    weights = {n: t.clone() for n, t in backend.named_weights()}
    if dist.get_rank() == 0:
        torch.save(weights, weights_path(out, name))
    parallel_state.destroy_model_parallel()
    return result


def count_forwards(model) -> dict[str, int]:
    """Counts from now on the forwards of the model's transformer layers and of their core
    attention (a pre-hook: it sees a recomputed forward too)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    counts = {"layer": 0, "core_attention": 0}

    def counter(key):
        def count(module, args, kwargs):
            counts[key] += 1

        return count

    for module in model.modules():
        if isinstance(module, TransformerLayer):
            module.register_forward_pre_hook(counter("layer"), with_kwargs=True)
            attention = module.self_attention.core_attention
            attention.register_forward_pre_hook(counter("core_attention"), with_kwargs=True)
    return counts


def gate_host_steps(backend, gated_steps: int) -> dict[int, bool]:
    """Holds the last parameter's host step of optimizer steps 1..gated_steps until the
    next forward has entered the first transformer layer (a named point: that layer's
    pre-hook, after the overlap's own). Without the overlap that forward would wait for the
    whole host step, and the gate times out instead. Returns, per step, whether the forward
    opened it."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    overlap = backend.host_adam
    gates = {n: threading.Event() for n in range(1, gated_steps + 1)}
    opened: dict[int, bool] = {}

    def hold_last(step: int, position: int, count: int) -> None:
        if position == count - 1 and step in gates:
            opened[step] = gates[step].wait(timeout=60)

    def open_gate(module, args) -> None:
        if overlap.in_flight in gates:
            gates[overlap.in_flight].set()

    overlap.on_host_step = hold_last
    first = next(m for m in backend.model.modules() if isinstance(m, TransformerLayer))
    first.register_forward_pre_hook(open_gate)
    return opened


def initial_export_matches(name: str) -> bool:
    """Export before any step equals the HF checkpoint tensors bit for bit."""
    from megatron.core import parallel_state

    from training.megatron.backend import MegatronBackend

    backend = MegatronBackend(layout_config(name, dist.get_world_size()), torch.device("cpu"))
    expected = dict(checkpoint_tensors(build_tiny_model(SEED)))
    exported = dict(backend.named_weights())
    parallel_state.destroy_model_parallel()
    same_names = list(exported) == list(expected) or set(exported) == set(expected)
    return same_names and all(torch.equal(exported[n], expected[n]) for n in expected)


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    batches = rollout_rows()
    results = {}
    for name in names:
        results[name] = run_layout(name, batches, out)
        results[name]["exported_equals_hf_at_start"] = initial_export_matches(name)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
