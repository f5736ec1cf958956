"""A real SGLang server against Sluice's transformers engine, on one GPU (bench/run_gpu_sglang.sh).

On the topology model (bench/topology.py: Qwen3-30B-A3B's widths, `--layers` layers, random
bf16 weights), in one process, with baselines measured in the same run:
1. rollout tokens/s: `--prompts` x `--new-tokens` sampled by the transformers engine, then by
   the SGLang engine (Sluice's `SglangEngine` driving `python -m sglang.launch_server`). The
   lm_head row of EOS is zeroed and the other rows scaled x10 so that no response ends early
   (random weights would end one after about 128 tokens): every response is `--new-tokens` long.
2. colocated sync: the model's weights, bf16 on the GPU, sent to the server the way colocated
   trainers send them (memory released; weights resumed; each 512 MiB bucket packed on the GPU
   and handed over as a CUDA IPC handle through `/update_weights_from_tensor`; cache resumed),
   against a device-to-device copy of the same bytes.
3. train/rollout log-prob mismatch in bf16: SGLang samples `--mismatch-prompts` x 32 tokens and
   reports each token's experts (`--enable-return-routed-experts`); the torch training backend
   scores the same batch routing on its own, then replaying SGLang's routing (R3).

    python -m bench.bench_sglang --out results.json      # on a GPU node with SGLang
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import driver
from inference import create_engine
from inference.engine import CACHE_MEMORY, WEIGHT_MEMORY, SamplingParams
from inference.sglang.engine import EngineSite, SglangEngine
from models.safetensors_io import SafetensorsReader, write_sharded
from models.tiny import EOS, VOCAB
from placement.planner import ClusterShape, NodeShape, plan_layout
from weights.ipc import IpcExport
from weights.manifest import manifest_of, plan_buckets

DEVICE_BUNDLE_FLAGS = [
    "--sglang-attention-backend", "triton", "--sglang-sampling-backend", "pytorch",
    "--sglang-grammar-backend", "none", "--sglang-dtype", "bfloat16",
]  # fmt: skip
"""The backends the device bundle (bench/pack_sglang_run.sh) carries: it leaves out
FlashAttention-3 and flashinfer's kernels."""


def make_sglang_engine(model_dir: Path, out_dir: Path, *flags: str) -> SglangEngine:
    """Sluice's SGLang engine 0 on this machine's GPU 0, colocated with one trainer, placed as
    the driver plans it (the server gets `--enable-memory-saver`)."""
    config, _ = driver.parse_args(
        ["--rollout.engine", "sglang", "--model.hf_checkpoint", str(model_dir),
         "--train.num_workers", "1", "--rollout.num_engines", "1",
         "--placement.colocate", "true", "--logging.output_dir", str(out_dir),
         "--rollout.sglang.startup_timeout_s", "240", *DEVICE_BUNDLE_FLAGS, *flags]
    )  # fmt: skip
    node = NodeShape(node_id="f" * 56, address="127.0.0.1", num_gpus=1, num_cpus=8.0)
    layout = plan_layout(ClusterShape((node,)), config)
    return SglangEngine(config, 0, EngineSite(layout, gpu_ids=[[0]], node_options=[{}]))


def colocated_sync(
    engine: SglangEngine,
    weights: list[tuple[str, torch.Tensor]],
    version: int,
    bucket_bytes: int = 512 << 20,
) -> float:
    """One colocated sync as the driver runs it (one training rank on the engine's GPU);
    returns its seconds, from the memory release to the cache's resumption."""
    plan = plan_buckets(manifest_of(weights), bucket_bytes=bucket_bytes)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()
    start = time.perf_counter()
    export = IpcExport(iter(weights), serving=True, device=device)
    engine.release_memory()
    engine.resume_memory(WEIGHT_MEMORY)
    engine.check_weights_update(plan)
    sent = [bucket for bucket in plan if bucket.nbytes]
    for bucket in plan:
        handle = export.bucket(bucket)
        if bucket.nbytes:
            engine.update_weights_from_tensor([handle], version if bucket is sent[-1] else None)
    export.finish()
    engine.finish_weight_update(version)
    engine.resume_memory(CACHE_MEMORY)
    return time.perf_counter() - start


def write_long_answer_model(directory: Path, layers: int) -> None:
    """The topology model whose responses never end before the token limit."""
    from bench.topology import write_model

    with tempfile.TemporaryDirectory() as scratch:
        write_model(Path(scratch), layers)
        reader = SafetensorsReader(scratch)
        eos = VOCAB.index(EOS)

        def tensors():
            for name in reader.names():
                tensor = reader.read(name)
                if name == "lm_head.weight":
                    tensor = tensor * 10
                    tensor[eos] = 0
                yield name, tensor

        extra = sorted(p for p in Path(scratch).iterdir() if not p.name.endswith(".safetensors"))
        extra = [p for p in extra if p.name != "model.safetensors.index.json"]
        write_sharded(directory, tensors(), extra_files=extra)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Digit prompts ending in `=` (the built-in task's shape)."""
    rng = np.random.default_rng(seed)
    return [[*rng.integers(3, 13, rng.integers(3, 8)).tolist(), 13] for _ in range(count)]


def tokens_per_second(engine, batch: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(tokens/s, mean response length) of one generation of `batch`."""
    params = SamplingParams(new_tokens, 1.0, 1.0, 0, seed=1)
    engine.generate(batch[:8], SamplingParams(16, seed=0))  # warm: kernels compile on first use
    torch.cuda.synchronize()
    start = time.perf_counter()
    completions = engine.generate(batch, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    return tokens / seconds, tokens / len(completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--mismatch-prompts", type=int, default=64)
    parser.add_argument("--skip", nargs="*", default=[], choices=("transformers", "mismatch"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from bench.bench_routing_replay import start_world

    device = torch.device("cuda", 0)
    start_world(device)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "layers": args.layers}
    batch = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "topology"
        write_long_answer_model(model_dir, args.layers)
        if "transformers" not in args.skip:
            config, _ = driver.parse_args(
                ["--model.hf_checkpoint", str(model_dir), "--model.dtype", "bfloat16"]
            )
            engine = create_engine(config, device)
            rate, length = tokens_per_second(engine, batch, args.new_tokens)
            results["transformers"] = {"tokens_per_s": rate, "mean_length": length}
            print(f"transformers engine: {rate:,.0f} tokens/s (mean length {length:.0f})")
            del engine
            torch.cuda.empty_cache()

        engine = make_sglang_engine(
            model_dir,
            Path(scratch) / "out",
            *("--algorithm.routing_replay", "true", "--sglang-mem-fraction-static", "0.4"),
        )
        try:
            results["sglang_version"] = engine.server_version
            routing, engine.client.routing = engine.client.routing, None  # plain generation
            rate, length = tokens_per_second(engine, batch, args.new_tokens)
            engine.client.routing = routing
            results["sglang"] = {"tokens_per_s": rate, "mean_length": length}
            print(f"sglang {engine.server_version}: {rate:,.0f} tokens/s (mean {length:.0f})")
            if "transformers" in results:
                ratio = rate / results["transformers"]["tokens_per_s"]
                print(f"  {ratio:.1f}x the transformers engine")

            reader = SafetensorsReader(model_dir)
            weights = [(n, reader.read(n).to(device)) for n in reader.names()]
            nbytes = sum(t.numel() * t.element_size() for _, t in weights)
            seconds = [colocated_sync(engine, weights, version) for version in (1, 2, 3)]
            flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
            copies = []
            for _ in range(3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                offset = 0
                for _, t in weights:
                    size = t.numel() * t.element_size()
                    flat[offset : offset + size].copy_(t.reshape(-1).view(torch.uint8))
                    offset += size
                torch.cuda.synchronize()
                copies.append(time.perf_counter() - start)
            sync, copy = statistics.median(seconds), statistics.median(copies)
            results["colocated_sync"] = {"bytes": nbytes, "seconds": seconds, "copy": copies}
            print(
                f"colocated sync of {nbytes / 2**30:.2f} GiB: {sync:.3f} s (median of 3; "
                f"{nbytes / sync / 1e9:.1f} GB/s); a device copy of the same bytes "
                f"{copy:.4f} s: {sync / copy:.0f}x"
            )
            del weights, flat

            if "mismatch" not in args.skip:
                asked = prompts(args.mismatch_prompts, seed=1)
                completions = engine.generate(asked, SamplingParams(32, seed=2))
                results["mismatch"] = mismatch(args, model_dir, asked, completions)
        finally:
            engine.shutdown()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def mismatch(args, model_dir, asked, completions) -> dict:
    """Trainer (torch backend, bf16) against SGLang's log-probs, without and with R3."""
    from bench.bench_routing_replay import score, scoring_batch

    batch = scoring_batch(asked, completions)
    args.device, args.dtype, args.backend = torch.device("cuda", 0), "bfloat16", "torch"
    args.model_dir, args.num_experts = model_dir, 128
    free = score(args, completions, batch, asked, replay=False)
    replayed = score(args, completions, batch, asked, replay=True)
    names = ("routed_unlike_engine", "mean_abs_dlogp", "max_abs_dlogp")
    print(
        f"log-prob mismatch, trainer (torch, bf16) vs sglang: without R3 {free[0]:.2%} of "
        f"(position, layer) routed unlike SGLang, mean |dlogp| {free[1]:.2e}, max {free[2]:.2e}; "
        f"with R3 {replayed[0]:.2%}, mean {replayed[1]:.2e}, max {replayed[2]:.2e}"
    )
    without, with_r3 = dict(zip(names, free, strict=True)), dict(zip(names, replayed, strict=True))
    return {"without_r3": without, "with_r3": with_r3}


if __name__ == "__main__":
    main()
