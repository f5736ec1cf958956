"""FP8 rollouts on one GPU: quantization speed, fp8 vs bf16 sync cost, fp8 vs bf16 log-probs.

    python3 -m bench.bench_fp8 [--out DIR] [--layers 4] [--mismatch-layers 2]

(a) `quantize`: `weights.fp8.quantize_blockwise` (read bf16, write e4m3 + scales) in GB/s of
    bytes read and written, against a plain device-to-device copy of the same bf16 tensor
    timed in the same run (the card's usable memory bandwidth), on one large matrix and on one
    MoE layer's 384 expert matrices: one by one, and through the sync's export, which
    quantizes each run of same-shape experts in one batch.
(b) `sync`: the weight sync of a model built from Qwen3-30B-A3B's config (its real sizes: 128
    experts, hidden 2048, vocab 151936; `--layers` of its 48 layers), bf16 against fp8, in the
    same run. One GPU cannot host both ends of an NCCL broadcast (NCCL refuses two ranks on one
    GPU), so what is measured is each end's own work: the sender's `WeightSender.send` over a
    one-rank NCCL group (handshake, packing, quantization, the broadcast call with no peer)
    and the receiver's unpacking of every bucket into an engine's tensors (a transformers FP8
    engine model for fp8); `d2d_copy_s` times a copy of the same bytes (the transfer at HBM
    speed), and `projected_s` adds sender + bytes / `--link-gbps` + receiver: a projection for
    two GPUs, not a measurement.
(c) `mismatch`: rollouts of the transformers engine in bf16 and in fp8 (its `Fp8Linear` /
    `Fp8Experts` holding the same weights, quantized as the sync quantizes them, multiplying
    with cuBLAS's block fp8 GEMM), each scored by the bf16 model as the trainer scores them:
    |log-prob difference|, importance ratio, KL, and the fraction of tokens TIS would truncate
    at cap 2. `fp8_weights_bf16_compute` (the dequantized fp8 weights in a bf16 model: the
    weight rounding alone, without the activations') is measured beside them.
    The models are random-init (nothing is downloaded), so the figures show magnitudes only.

(d) `gemm`: the engine's fp8 matmul (`block_fp8_matmul`: activation quantization, padding,
    cuBLAS's block-scaled GEMM) and cuBLAS's GEMM alone in TFLOP/s, against a bf16 matmul of
    the same shape in the same run, on Qwen3-30B-A3B's matrix shapes.

Prints one JSON summary (and writes it to DIR/bench_fp8.json); a part that fails records its
error and the others still run.
"""

import argparse
import json
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from config.schema import ModelConfig
from inference.engine import SamplingParams
from inference.fp8_layers import block_fp8_matmul, quantize_activations
from inference.fp8_model import build_fp8_model, fp8_device_problem, fp8_kernel_problem
from inference.transformers_engine import TransformersEngine
from models.checkpoint_format import checkpoint_tensors
from models.fp8_checkpoint import Fp8Format
from models.reference import qwen3_30b_a3b_config
from rl.grpo import log_prob_mismatch, log_probs_from_logits, truncated_importance_weights
from weights.fp8 import dequantize_blockwise, quantize_blockwise
from weights.fp8_export import Fp8Export
from weights.manifest import manifest_of, plan_buckets
from weights.process_group import GroupInfo, init_weights_update_group
from weights.sync import WeightSender, _pack, _Staging, _unpack

EOS, PAD = 151645, 151643
"""Qwen3's <|im_end|> and <|endoftext|> ids (a random-init model rarely samples them)."""

BUCKET_BYTES = 64 << 20
"""weight_sync.bucket_size_mb's default."""


def qwen3_moe(layers: int, initializer_range: float = 0.02) -> transformers.Qwen3MoeConfig:
    return qwen3_30b_a3b_config(num_hidden_layers=layers, initializer_range=initializer_range)


def build(config: transformers.PretrainedConfig, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval()


def cuda_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn` on the GPU (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


# ---- (a) the quantization kernel --------------------------------------------------------


def bench_quantize(device: torch.device, compile_too: bool) -> dict:
    large = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    copy_dst = torch.empty_like(large)
    elements = large.numel()
    moved = elements * (2 + 1) + (elements // (128 * 128)) * 4  # bf16 in, e4m3 + scales out
    quantize_s = cuda_seconds(lambda: quantize_blockwise(large), repeats=10)
    copy_s = cuda_seconds(lambda: copy_dst.copy_(large), repeats=10)
    out = {
        "large_8192x8192": {
            "quantize_s": quantize_s,
            "quantize_GBps": moved / quantize_s / 1e9,
            "copy_s": copy_s,
            "copy_GBps": 2 * large.nbytes / copy_s / 1e9,
        }
    }
    out["large_8192x8192"]["quantize/copy_bandwidth"] = (
        out["large_8192x8192"]["quantize_GBps"] / out["large_8192x8192"]["copy_GBps"]
    )
    # One MoE layer's experts, one tensor at a time (what a sync did with its 19k tensors).
    experts = [
        torch.randn(*shape, device=device, dtype=torch.bfloat16)
        for _ in range(128)
        for shape in ((768, 2048), (768, 2048), (2048, 768))
    ]
    expert_bytes = sum(t.numel() for t in experts) * 3
    each_s = cuda_seconds(lambda: [quantize_blockwise(t) for t in experts], repeats=5)
    dsts = [torch.empty_like(t) for t in experts]
    copy_each_s = cuda_seconds(
        lambda: [d.copy_(t) for d, t in zip(dsts, experts, strict=True)], repeats=5
    )
    out["one_layer_of_experts_384_tensors"] = {
        "quantize_s": each_s,
        "quantize_GBps": expert_bytes / each_s / 1e9,
        "copy_s": copy_each_s,
        "copy_GBps": 2 * sum(t.nbytes for t in experts) / copy_each_s / 1e9,
    }
    # The same tensors in the sync's order (every expert's gate and up, then the downs)
    # through the sync's fp8 export, which quantizes each run of one shape together.
    prefix = "model.layers.0.mlp.experts"
    named = [
        (f"{prefix}.{e}.{p}.weight", experts[3 * e + i])
        for e in range(128)
        for i, p in enumerate(("gate_proj", "up_proj"))
    ]
    named += [(f"{prefix}.{e}.down_proj.weight", experts[3 * e + 2]) for e in range(128)]
    export = Fp8Export(Fp8Format())
    batched_s = cuda_seconds(lambda: list(export.tensors(named)), repeats=5)
    out["one_layer_of_experts_384_tensors"] |= {
        "export_batched_s": batched_s,
        "export_batched_GBps": expert_bytes / batched_s / 1e9,
        "one_by_one/batched_s": each_s / batched_s,
    }
    if compile_too:
        try:
            compiled = torch.compile(quantize_blockwise, dynamic=False)
            start = time.perf_counter()
            compiled(large)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            seconds = cuda_seconds(lambda: compiled(large), repeats=10)
            q, s = quantize_blockwise(large)
            cq, cs = compiled(large)
            out["large_8192x8192"]["compiled"] = {
                "quantize_s": seconds,
                "quantize_GBps": moved / seconds / 1e9,
                "compile_s": compile_s,
                "bit_equal_to_eager": bool(
                    torch.equal(q.view(torch.uint8), cq.view(torch.uint8)) and torch.equal(s, cs)
                ),
            }
        except Exception as e:  # informative only
            out["large_8192x8192"]["compiled"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


# ---- (b) the sync, bf16 against fp8 -----------------------------------------------------


def one_rank_group(device: torch.device):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return init_weights_update_group(GroupInfo("127.0.0.1", port, 1, backend="nccl"), rank=0)


def bench_sync(device: torch.device, layers: int, link_gbps: float, repeats: int) -> dict:
    config = qwen3_moe(layers)
    model = build(config, device)
    weights = [(n, t.contiguous()) for n, t in checkpoint_tensors(model)]
    fmt = Fp8Format()
    group = one_rank_group(device)
    result = {
        "model": f"Qwen3-30B-A3B config, {layers} of its 48 layers, bf16",
        "params_B": sum(t.numel() for _, t in weights) / 1e9,
        "bucket_MiB": BUCKET_BYTES >> 20,
        "link_GBps_assumed": link_gbps,
    }
    with tempfile.TemporaryDirectory() as scratch:
        fp8_dir = Path(scratch)
        config.save_pretrained(fp8_dir)
        engine_config = ModelConfig(hf_checkpoint=str(fp8_dir), dtype="bfloat16")
        for mode in ("bf16", "fp8"):
            export = Fp8Export(fmt) if mode == "fp8" else None
            specs = manifest_of(weights)
            plan = plan_buckets(export.specs(specs) if export else specs, BUCKET_BYTES)

            def stream(export=export, weights=weights):
                return export.tensors(weights) if export else iter(weights)

            sender = WeightSender(group)
            sender.send(plan, stream(), 0)  # warm-up
            send_s = sorted(sender.send(plan, stream(), v).seconds for v in range(repeats))
            send_s = send_s[len(send_s) // 2]
            if mode == "fp8":
                engine_model = build_fp8_model(engine_config, fmt, device)
                dests = dict(checkpoint_tensors(engine_model))
            else:
                engine_model = None
                dests = {n: torch.empty_like(t) for n, t in weights}
            unpack_s, nbytes = _time_unpack(plan, stream(), dests, device)
            flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
            other = torch.empty_like(flat)
            copy_s = cuda_seconds(lambda a=flat, b=other: b.copy_(a), repeats=5)
            result[mode] = {
                "bytes_GB": nbytes / 1e9,
                "buckets": len(plan),
                "sender_s": send_s,
                "receiver_unpack_s": unpack_s,
                "d2d_copy_s": copy_s,
                "projected_s": send_s + nbytes / (link_gbps * 1e9) + unpack_s,
            }
            del engine_model, dests, flat, other
            torch.cuda.empty_cache()
    group.close()
    result["fp8/bf16_bytes"] = result["fp8"]["bytes_GB"] / result["bf16"]["bytes_GB"]
    result["fp8/bf16_sender_s"] = result["fp8"]["sender_s"] / result["bf16"]["sender_s"]
    result["fp8/bf16_projected_s"] = result["fp8"]["projected_s"] / result["bf16"]["projected_s"]
    del model, weights
    torch.cuda.empty_cache()
    return result


def _time_unpack(plan, tensors, dests, device) -> tuple[float, int]:
    """Pack every bucket once (untimed), then time unpacking them all into `dests`."""
    staging = _Staging(device)
    packed = []
    tensors = iter(tensors)
    for bucket in plan:
        part = [next(tensors)[1] for _ in bucket.specs]
        packed.append((bucket, _pack(bucket, part, staging, device).clone()))
    nbytes = sum(b.nbytes for b in plan)

    def unpack():
        for bucket, buffer in packed:
            _unpack(buffer.split(bucket.sizes), [dests[s.name] for s in bucket.specs])

    return cuda_seconds(unpack, repeats=3, warmup=1), nbytes


# ---- (c) log-prob mismatch of fp8 vs bf16 rollouts --------------------------------------


def bench_mismatch(device: torch.device, layers: int, prompts: int, new_tokens: int) -> dict:
    config = qwen3_moe(layers, initializer_range=0.04)
    trainer = build(config, device)
    fmt = Fp8Format()
    weights = [(n, t.contiguous()) for n, t in checkpoint_tensors(trainer)]
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(10, 5000, (8 + i % 8,), generator=g).tolist() for i in range(prompts)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    out = {
        "model": f"Qwen3-30B-A3B config, {layers} layers, random init (std 0.04)",
        "samples": prompts,
        "max_new_tokens": new_tokens,
    }

    def engine(model) -> TransformersEngine:
        return TransformersEngine(model, eos_token_id=EOS, pad_token_id=PAD, max_batch_size=64)

    out["bf16_engine"] = _score(engine(trainer), trainer, batch, params, device)
    problem = fp8_kernel_problem(device)
    if problem is None:
        with tempfile.TemporaryDirectory() as scratch:
            config.save_pretrained(scratch)
            model_config = ModelConfig(hf_checkpoint=scratch, dtype="bfloat16")
            fp8_model = build_fp8_model(model_config, fmt, device)
        dests = dict(checkpoint_tensors(fp8_model))
        with torch.no_grad():
            for name, tensor in Fp8Export(fmt).tensors(weights):
                dests[name].copy_(tensor)  # what the receiver writes
        out["fp8_engine"] = _score(engine(fp8_model), trainer, batch, params, device)
        del fp8_model, dests
    else:
        out["fp8_engine"] = {"error": f"the block fp8 GEMM does not run here: {problem}"}
    emulated = build(config, device)
    with torch.no_grad():
        held = dict(checkpoint_tensors(emulated))
        for name, tensor in weights:
            if fmt.quantizes(name):
                q, s = quantize_blockwise(tensor, fmt.block_size)
                held[name].copy_(dequantize_blockwise(q, s, fmt.block_size, torch.bfloat16))
    out["fp8_weights_bf16_compute"] = _score(engine(emulated), trainer, batch, params, device)
    return out


def _score(engine, trainer, prompts, params, device) -> dict:
    torch.manual_seed(1)
    start = time.perf_counter()
    completions = engine.generate(prompts, params)
    generate_s = time.perf_counter() - start
    train_lp, rollout_lp, logit_std = [], [], []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = torch.tensor([prompt + completion.token_ids], device=device)
            logits = trainer(input_ids=ids).logits[:, :-1]
            logit_std.append(logits.float().std().item())
            lp = log_probs_from_logits(logits, ids[:, 1:], params.temperature)[0]
            train_lp.append(lp[len(prompt) - 1 :].float().cpu())
            rollout_lp.append(torch.tensor(completion.log_probs))
    train, rollout = torch.cat(train_lp)[None], torch.cat(rollout_lp)[None]
    mask = torch.ones_like(train)
    stats = {k: v.item() for k, v in log_prob_mismatch(train, rollout, mask).items()}
    tis = truncated_importance_weights(train, rollout, cap=2.0)
    stats["tis_clip_fraction_cap2"] = tis.truncated.float().mean().item()
    stats["tis_weight_mean_cap2"] = tis.weights.mean().item()
    stats["generate_s"] = generate_s
    stats["trainer_logit_std"] = sum(logit_std) / len(logit_std)
    return stats


# ---- (d) the engine's fp8 GEMM against bf16 ----------------------------------------------

GEMM_SHAPES = {
    "square_4096": (4096, 4096, 4096),
    "expert_gate_up_512_tokens": (512, 1536, 2048),
    "expert_down_512_tokens": (512, 2048, 768),  # K = 768: padded to 1024 for cuBLAS
    "decode_64_tokens_q_proj": (64, 4096, 2048),
}
"""(M tokens, N outputs, K inputs) of Qwen3-30B-A3B's matrices, and one large square."""


def bench_gemm(device: torch.device) -> dict:
    """`block_fp8_matmul` (activation quantization, padding and cuBLAS's block fp8 GEMM: what
    the engine's modules run) and the GEMM alone, against a bf16 matmul of the same shape."""
    block = (128, 128)
    out = {}
    for label, (m, n, k) in GEMM_SHAPES.items():
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        weight, scales = quantize_blockwise(w, block)
        flops = 2 * m * n * k
        bf16_s = cuda_seconds(lambda x=x, w=w: x @ w.t(), repeats=20)
        fp8_s = cuda_seconds(
            lambda x=x, q=weight, s=scales: block_fp8_matmul(x, q, s, block), repeats=20
        )
        row = {"bf16_TFLOPs": flops / bf16_s / 1e12, "fp8_module_TFLOPs": flops / fp8_s / 1e12}
        if k % 512 == 0 and m % 4 == 0:  # no padding: time cuBLAS's GEMM by itself
            xq, xs = quantize_activations(x, 128)
            xs = xs.t().contiguous().t()
            gemm_s = cuda_seconds(
                lambda a=xq, sa=xs, q=weight, s=scales: torch._scaled_mm(
                    a, q.t(), scale_a=sa, scale_b=s.t(), out_dtype=torch.bfloat16
                ),
                repeats=20,
            )
            row["fp8_gemm_only_TFLOPs"] = flops / gemm_s / 1e12
        row["fp8_module/bf16_time"] = fp8_s / bf16_s
        out[label] = row
    return out


# ---- the summary ------------------------------------------------------------------------


def attempt(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:1000]}
    finally:
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write bench_fp8.json here")
    parser.add_argument("--layers", type=int, default=4, help="(b): layers of Qwen3-30B-A3B")
    parser.add_argument("--mismatch-layers", type=int, default=2, help="(c): layers")
    parser.add_argument("--samples", type=int, default=64, help="(c): rollouts per engine")
    parser.add_argument("--new-tokens", type=int, default=32, help="(c): tokens per rollout")
    parser.add_argument("--repeats", type=int, default=3, help="(b): timed syncs per mode")
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=372.0,
        help="(b): link bandwidth for the projection (GB/s; 372 = NCCL broadcast measured "
        "between two NVLink H100s, ../shared/device/README.md)",
    )
    parser.add_argument("--no-compile", action="store_true", help="(a): skip torch.compile")
    parser.add_argument(
        "--parts", nargs="+", default=["quantize", "gemm", "sync", "mismatch"], help="what to run"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8 needs a CUDA GPU")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    summary = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "device": torch.cuda.get_device_name(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fp8_engine_problem": fp8_device_problem(device) or fp8_kernel_problem(device),
    }
    parts = {
        "quantize": lambda: bench_quantize(device, not args.no_compile),
        "gemm": lambda: bench_gemm(device),
        "sync": lambda: bench_sync(device, args.layers, args.link_gbps, args.repeats),
        "mismatch": lambda: bench_mismatch(
            device, args.mismatch_layers, args.samples, args.new_tokens
        ),
    }
    for name in args.parts:
        start = time.perf_counter()
        summary[name] = attempt(parts[name])
        summary[name]["wall_s"] = time.perf_counter() - start
        print(f"[bench_fp8] {name} done in {summary[name]['wall_s']:.1f} s", flush=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_fp8.json").write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    main()
