"""Save a trained model and its optimizer as torch_dist, resume, and train on: same weights.

Started by tests/test_megatron_checkpoint.py as
    torchrun --nproc-per-node 2 tests/megatron/checkpoint_resume.py ROOT VARIANT [VARIANT ...]
with the CPU shim on PYTHONPATH. For each variant (`plain`: megatron-core's non-distributed
optimizer; `distributed`: the distributed optimizer in fp32; `distributed-bf16`: with bf16
weights and fp32 main copies; `cpuadam-bf16`: the same with Adam on the CPU) two replicas of
the built-in model are built with megatron-core DDP (data parallel over both ranks). The
first takes two steps, is saved and committed under ROOT/VARIANT; the second, built from
other weights, loads the latest checkpoint. Both then take the same third step and must agree
bit for bit, which only happens when the Adam moments, step count and fp32 main weights were
all restored. Rank 0
prints `resumed VARIANT` per success.

The variant `cross-spec` checks the two layer specs' checkpoints instead, at EP2 (each rank
holds half the experts): weights saved from a model of one spec (`torch`: stacked experts;
`local`: SequentialMLP) load into a model of the other, which then exports exactly the saved
model's Hugging Face tensors. Rank 0 prints `loaded torch->local` and `loaded local->torch`.

The variant `schedule` resumes the whole `MegatronBackend` (DP2) under a cosine learning-rate
schedule with warm-up: two steps, a checkpoint, a fresh backend that loads it and takes three
more, against one that took five without stopping: every step's lr the same, and the weights
bit for bit. Rank 0 prints `schedule resumed`.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from config.schema import ParallelConfig
from models.checkpoint_format import checkpoint_tensors
from models.tiny import build_tiny_model, tiny_config
from training.megatron.checkpoint import (
    commit,
    latest,
    load_torch_dist,
    save_torch_dist,
    staging_dir,
    unwrap,
)
from training.megatron.hf_weights import load_hf_weights
from training.megatron.model import build_gpt_model, init_model_parallel
from training.megatron.model_config import model_shape

VARIANTS = {
    "plain": dict(dtype="float32", use_distributed_optimizer=False),
    "distributed": dict(dtype="float32", use_distributed_optimizer=True),
    "distributed-bf16": dict(dtype="bfloat16", use_distributed_optimizer=True),
    "cpuadam-bf16": dict(
        dtype="bfloat16",
        use_distributed_optimizer=True,
        optimizer_cpu_offload=True,
        optimizer_offload_fraction=1.0,
        use_precision_aware_optimizer=True,
    ),
}


def build_replica(variant: dict, seed: int):
    """(DDP model, optimizer) over the tiny model's weights of `seed`."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    options = dict(variant)
    dtype = options.pop("dtype")
    torch_dtype = getattr(torch, dtype)
    hf = tiny_config()
    model = build_gpt_model(hf, ParallelConfig(), dtype, torch.device("cpu"))
    weights = dict(checkpoint_tensors(build_tiny_model(seed, torch_dtype)))
    load_hf_weights(model, weights.__getitem__, model_shape(hf), model.config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=options["use_distributed_optimizer"],
    )
    ddp = DistributedDataParallel(model.config, ddp_config, module=model)
    config = OptimizerConfig(
        optimizer="adam",
        lr=0.01,
        bf16=dtype == "bfloat16",
        params_dtype=torch_dtype,
        **options,
    )
    return ddp, get_megatron_optimizer(config, [ddp])


def train_step(ddp, optimizer, step: int) -> None:
    """One step on rows that differ by rank and step, the same for every replica."""
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    ids = torch.randint(3, 14, (2, 8), generator=generator)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = ddp(ids, positions, attention_mask=None, labels=ids)
    loss.float().mean().backward()
    ddp.finish_grad_sync()
    optimizer.step()


def check_resume(root: Path, name: str) -> None:
    variant = VARIANTS[name]
    trained = build_replica(variant, seed=1)
    # Two steps: a step count of 2 tells a restored count from the 1 of a fresh optimizer.
    for step in (1, 2):
        train_step(*trained, step=step)
    save_torch_dist(staging_dir(root, 2), *trained)
    if dist.get_rank() == 0:
        commit(root, 2)
    dist.barrier()
    resumed = build_replica(variant, seed=2)
    load_torch_dist(latest(root), *resumed)
    for replica in (trained, resumed):
        train_step(*replica, step=3)
    expected = dict(unwrap(trained[0]).named_parameters())
    for key, param in unwrap(resumed[0]).named_parameters():
        if not torch.equal(param, expected[key]):
            raise AssertionError(f"{name}: {key} differs after resuming")
    if dist.get_rank() == 0:
        print(f"resumed {name}", flush=True)


def check_cross_spec(root: Path) -> None:
    from megatron.core import parallel_state

    from training.megatron.hf_weights import export_hf_weights
    from weights.runs import pairs

    parallel_state.destroy_model_parallel()
    expert_parallel = ParallelConfig(expert=2)
    init_model_parallel(expert_parallel, seed=0)
    hf = tiny_config()
    shape = model_shape(hf)

    def model(spec: str, seed: int):
        built = build_gpt_model(hf, expert_parallel, "float32", torch.device("cpu"), spec)
        weights = dict(checkpoint_tensors(build_tiny_model(seed)))
        load_hf_weights(built, weights.__getitem__, shape, built.config)
        return built

    def exported(built) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in pairs(export_hf_weights(built, shape, built.config))}

    for saved_spec, loaded_spec in (("torch", "local"), ("local", "torch")):
        saved = model(saved_spec, seed=1)
        directory = root / f"{saved_spec}-to-{loaded_spec}"
        save_torch_dist(directory, saved)
        loaded = model(loaded_spec, seed=2)
        load_torch_dist(directory, loaded)
        expected, got = exported(saved), exported(loaded)
        if expected.keys() != got.keys():
            raise AssertionError(f"{saved_spec}->{loaded_spec}: other tensor names")
        for name, tensor in expected.items():
            if not torch.equal(got[name], tensor):
                raise AssertionError(f"{saved_spec}->{loaded_spec}: {name} differs")
        if dist.get_rank() == 0:
            print(f"loaded {saved_spec}->{loaded_spec}", flush=True)
    parallel_state.destroy_model_parallel()
    init_model_parallel(ParallelConfig(), seed=0)


def check_schedule(root: Path) -> None:
    from megatron.core import parallel_state

    from tests.megatron.layouts import layout_config, rollout_rows
    from training.megatron.backend import MegatronBackend

    config = layout_config("dp2", dist.get_world_size())
    config.num_steps = 5
    t = config.train
    t.lr_decay_style, t.lr_warmup_iters, t.min_lr = "cosine", 2, 1e-3
    batches = rollout_rows()
    normalizer = float(sum(b.column("loss_mask").flatten().to_numpy().sum() for b in batches))

    def fresh() -> MegatronBackend:
        parallel_state.destroy_model_parallel()
        return MegatronBackend(config, torch.device("cpu"))

    def train(backend: MegatronBackend, count: int) -> list[float]:
        share = batches[backend.data_parallel_rank :: backend.data_parallel_size]
        return [backend.train(share, normalizer).lr for _ in range(count)]

    straight = fresh()
    expected = train(straight, 5)
    weights = {name: tensor.clone() for name, tensor in straight.named_weights()}
    # Where megatron-core's own scheduler puts it, so its optimizers step with it.
    if any(group["lr"] != expected[-1] for group in straight.optimizer.param_groups):
        raise AssertionError("schedule: the optimizer's parameter groups hold another lr")
    first = fresh()
    got = train(first, 2)
    first.save_checkpoint(str(staging_dir(root, 2)))
    if dist.get_rank() == 0:
        commit(root, 2)
    dist.barrier()
    resumed = fresh()
    resumed.load_checkpoint(str(latest(root)), with_optimizer=True)
    got += train(resumed, 3)
    if got != expected or len(set(expected)) != 5:
        raise AssertionError(f"schedule: lr {got} after resuming, {expected} without")
    for name, tensor in resumed.named_weights():
        if not torch.equal(tensor, weights[name]):
            raise AssertionError(f"schedule: {name} differs after resuming")
    parallel_state.destroy_model_parallel()
    init_model_parallel(ParallelConfig(), seed=0)
    if dist.get_rank() == 0:
        print("schedule resumed", flush=True)


def main() -> None:
    root, names = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    init_model_parallel(ParallelConfig(), seed=0)
    for name in names:
        if name == "cross-spec":
            check_cross_spec(root / name)
        elif name == "schedule":
            check_schedule(root / name)
        else:
            check_resume(root / name, name)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
