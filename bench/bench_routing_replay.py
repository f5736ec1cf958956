"""Train/rollout log-prob mismatch with and without rollout routing replay (R3).

The transformers engine generates and records each token's experts; a training backend then
scores the same Arrow batch, once routing on its own and once replaying the engine's routing
(what `algorithm.routing_replay` does in the loop). Printed per row: how many (position, MoE
layer) pairs the trainer routed to another expert set than the engine, and the mean and max
|trainer - engine| log-prob of the response tokens.

- On the CPU (default): the built-in Qwen3-MoE in fp32. Engine and trainer hold the same
  weights and compute alike, so the engine's router weights are perturbed by Gaussian noise of
  std `--noise` (the role bf16 / fp8 kernels play on a GPU); noise 0 is the baseline.
- On a GPU (`--gpu`): bf16, no perturbation: the mismatch is the one the kernels make. The
  model is the built-in one or (`--model topology`) Qwen3-30B-A3B's widths at `--layers` layers
  (128 experts, top-8; random weights, bench/topology.py); the trainer is the torch backend or
  (`--backend megatron`) the Megatron backend in a one-rank world.

    uv run python -m bench.bench_routing_replay
    python -m bench.bench_routing_replay --gpu --model topology --layers 2 --backend megatron
"""

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

import driver
from data.schema import build_rollout_batch
from inference import create_engine
from inference.engine import SamplingParams
from models.routing import RoutingRecorder, moe_routers


def prompts(count: int, seed: int) -> list[list[int]]:
    """Random digit prompts ending in `=` (the built-in task's shape)."""
    rng = np.random.default_rng(seed)
    return [[*rng.integers(3, 13, rng.integers(3, 8)).tolist(), 13] for _ in range(count)]


def sluice_config(args, replay: bool):
    argv = ["--algorithm.routing_replay", str(replay).lower(), "--model.dtype", args.dtype]
    argv += ["--train.backend", args.backend, "--train.max_tokens_per_micro_batch", "1048576"]
    if args.model_dir:
        argv += ["--model.hf_checkpoint", str(args.model_dir)]
    return driver.parse_args(argv)[0]  # one micro-batch: one forward to read the routing of


def rollout(args, noise: float, batch_prompts: list[list[int]]):
    engine = create_engine(sluice_config(args, True), args.device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in moe_routers(engine.model):
            perturbation = torch.randn(router.weight.shape, generator=generator)
            router.weight += noise * perturbation.to(router.weight)
    torch.manual_seed(1)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    completions = engine.generate(batch_prompts, params)
    del engine
    return completions, scoring_batch(batch_prompts, completions)


def scoring_batch(batch_prompts: list[list[int]], completions) -> "pa.RecordBatch":
    """The Arrow batch a rollout actor would build of these completions (no rewards: only the
    trainer's log-probs and routing are read from it)."""
    n = len(completions)
    return build_rollout_batch(
        {
            "prompt_ids": batch_prompts,
            "response_ids": [c.token_ids for c in completions],
            "rollout_log_probs": [c.log_probs for c in completions],
            "loss_mask": [[1] * len(c.token_ids) for c in completions],
            "reward": [0.0] * n,
            "advantage": [0.0] * n,
            "group_id": list(range(n)),
            "sample_index": [0] * n,
            "weight_version": [0] * n,
            "finish_reason": [c.finish_reason for c in completions],
            "routed_experts": [c.routed_experts for c in completions],
        }
    )


@contextlib.contextmanager
def routing_maps(backend, rows: int, num_experts: int):
    """Collects the trainer's expert choice in its one forward of `rows` rows, as
    [B, T, layers, experts] bool (`maps[0]` after the block), from transformers' routers or
    megatron-core's (whose tokens are sequence-first)."""
    maps: list[torch.Tensor] = []
    if hasattr(backend.model, "module"):  # Megatron: TopKRouter returns (probs, routing_map)
        from megatron.core.transformer.moe.router import TopKRouter

        seen: list[torch.Tensor] = []
        routers = [m for m in backend.model.modules() if isinstance(m, TopKRouter)]
        handles = [r.register_forward_hook(lambda m, i, o: seen.append(o[1])) for r in routers]
        yield maps
        for handle in handles:
            handle.remove()
        width = seen[0].shape[0] // rows
        sequence_first = torch.stack(seen, dim=1).view(width, rows, len(seen), num_experts)
        maps.append(sequence_first.transpose(0, 1).cpu())
    else:
        with RoutingRecorder(backend.model) as recorder:
            yield maps
        (call,) = recorder.calls
        ids = torch.stack(call, dim=1)  # [B * T, layers, top_k]
        one_hot = torch.zeros(*ids.shape[:2], num_experts, dtype=torch.bool, device=ids.device)
        one_hot.scatter_(-1, ids, True)
        maps.append(one_hot.view(rows, -1, *one_hot.shape[1:]).cpu())


def score(args, completions, batch, batch_prompts, replay: bool) -> tuple[float, float, float]:
    """(fraction of (position, layer) pairs routed unlike the engine, mean and max |diff|)."""
    config = sluice_config(args, replay)
    backend = make_backend(config, args.device)
    with torch.no_grad(), routing_maps(backend, len(completions), args.num_experts) as maps:
        log_probs = backend.compute_log_probs([batch])
    differ = []
    for b, (p, c) in enumerate(zip(batch_prompts, completions, strict=True)):
        fed = len(p) + len(c.token_ids) - 1
        engine = np.zeros((*c.routed_experts.shape[:2], args.num_experts), dtype=bool)
        np.put_along_axis(engine, c.routed_experts.astype(np.int64), True, axis=-1)
        differ.append((maps[0][b, :fed].numpy() != engine).any(axis=-1).ravel())
    pairs = zip(log_probs, completions, strict=True)
    diffs = torch.cat([(lp.float() - torch.tensor(c.log_probs)).abs() for lp, c in pairs])
    close_backend(backend)
    return float(np.concatenate(differ).mean()), diffs.mean().item(), diffs.max().item()


def make_backend(config, device: torch.device):
    if config.train.backend == "megatron":
        from training.megatron.backend import MegatronBackend

        return MegatronBackend(config, device)
    from training.torch_backend import TorchBackend

    return TorchBackend(config, device)


def close_backend(backend) -> None:
    if hasattr(backend.model, "module"):
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    del backend
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def start_world(device: torch.device) -> None:
    """A one-rank process group: the training backends are collectives."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="bf16 on cuda:0, no perturbation")
    parser.add_argument("--noise", type=float, nargs="+", default=None)
    parser.add_argument("--backend", choices=("torch", "megatron"), default="torch")
    parser.add_argument("--model", choices=("builtin", "topology"), default="builtin")
    parser.add_argument("--layers", type=int, default=2, help="topology model depth")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    args.device = torch.device("cuda", 0) if args.gpu else torch.device("cpu")
    args.dtype = "bfloat16" if args.gpu else "float32"
    noises = args.noise
    if noises is None:
        noises = [0.0] if args.gpu else [0.0, 0.005, 0.01, 0.02]
    start_world(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        args.model_dir, args.num_experts = None, 8
        if args.model == "topology":
            from bench.topology import topology_config, write_model

            args.model_dir = Path(scratch) / "topology"
            write_model(args.model_dir, args.layers)
            args.num_experts = topology_config(args.layers).num_experts
        batch_prompts = prompts(args.prompts, seed=0)
        print(
            f"model {args.model} ({args.layers if args.model_dir else 2} layers, "
            f"{args.num_experts} experts), {args.dtype} on {args.device}, engine: transformers, "
            f"trainer: {args.backend}, {args.prompts} prompts x {args.max_new_tokens} new tokens"
        )
        print(
            f"{'router noise':>12} | {'routed unlike engine':>20} | {'mean |dlogp|':>12} "
            f"{'max |dlogp|':>11} | {'with R3: unlike':>15} {'mean':>9} {'max':>9} | mean ratio"
        )
        for noise in noises:
            completions, batch = rollout(args, noise, batch_prompts)
            free = score(args, completions, batch, batch_prompts, replay=False)
            replayed = score(args, completions, batch, batch_prompts, replay=True)
            ratio = free[1] / replayed[1] if replayed[1] > 0 else float("nan")
            print(
                f"{noise:12g} | {free[0]:20.2%} | {free[1]:12.2e} {free[2]:11.2e} | "
                f"{replayed[0]:15.2%} {replayed[1]:9.2e} {replayed[2]:9.2e} | {ratio:9.1f}x",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
