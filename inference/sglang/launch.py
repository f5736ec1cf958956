"""Config + placement -> the exact `sglang.launch_server` command of every engine node.

Two steps, both pure (no Ray, no SGLang import), so `driver.py --dry-run` prints the same
command lines the RolloutActors run:
1. `resolve_server_args(config, num_experts)`: the user's flags, with the seed's old flags
   translated, the flags Sluice owns refused, and the redundant experts computed or checked.
   It returns notices explaining each change, for the dry run and the job log.
2. `server_launches(config, layout, engine, resolved, ...)`: one `ServerLaunch` per node the
   engine spans (SGLang runs one server process per node): `--nnodes`, `--node-rank`,
   `--dist-init-addr` and the GPUs (`CUDA_VISIBLE_DEVICES`) come from the placement, never
   from the user.
"""

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.errors import UserError
from config.schema import BUILTIN_MODEL, SluiceConfig
from inference.sglang.flags import CLI_PREFIX, as_argv, normalize, sglang_version
from placement.planner import Layout

PLACED = "Sluice derives it from the placement group"
OWNED_FLAGS: dict[str, str] = {
    "model-path": "it is model.hf_checkpoint",
    "tp-size": "it is the engine's GPU count, rollout.gpus_per_engine",
    "nnodes": PLACED,
    "node-rank": PLACED,
    "dist-init-addr": PLACED,
    "base-gpu-id": "the server's CUDA_VISIBLE_DEVICES holds exactly the engine's GPUs",
    "host": PLACED,
    "port": PLACED,
}
"""Flags a user must not give: Sluice sets them, and a second value would fight the first."""

SINGLE_REPLICA_FLAGS: dict[str, str] = {
    "pp-size": "weight updates address an engine's ranks as rank_offset + tp_rank, so an "
    "engine cannot be pipeline-parallel; use more engines (rollout.num_engines)",
    "dp-size": "one engine is one SGLang replica: use rollout.num_engines for more replicas, "
    "or attn-dp-size N for DP attention",
}
"""Flags whose only supported value is 1, and why."""

EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")
"""config.json keys holding the routed-expert count (Qwen3-MoE, DeepSeek, Mixtral)."""

LAUNCH_MODULE = "sglang.launch_server"


@dataclass(frozen=True)
class ResolvedServerArgs:
    """The user's SGLang flags ready for launch, and what was changed on the way."""

    args: dict[str, Any]
    """{flag name: value}, before the per-node flags of `server_launches`."""
    notes: tuple[str, ...]
    """One line per translation or computed value, for the dry run and the job log."""


@dataclass(frozen=True)
class ServerLaunch:
    """One `sglang.launch_server` process: the part of an engine on one node."""

    engine: int
    node_rank: int
    nnodes: int
    node_index: int
    """Index into `Layout.nodes`."""
    address: str
    """IP of the node it runs on."""
    gpu_ids: tuple[int | str, ...]
    """GPUs of this node that the server uses, as Ray numbers them, in tp_rank order."""
    visible_devices: str
    """CUDA_VISIBLE_DEVICES of the server process: exactly `gpu_ids` (Ray's ids are what
    CUDA_VISIBLE_DEVICES means on the node, also where Ray itself runs under a narrowed
    CUDA_VISIBLE_DEVICES); SGLang's ranks then use cuda:0, cuda:1, ... of them."""
    argv: tuple[str, ...]
    """Arguments after `python -m sglang.launch_server`."""

    @property
    def command(self) -> str:
        """The command line, as the dry run shows it."""
        return (
            f"CUDA_VISIBLE_DEVICES={self.visible_devices} python -m {LAUNCH_MODULE} "
            f"{shlex.join(self.argv)}"
        )


def resolve_server_args(config: SluiceConfig, num_experts: int | None) -> ResolvedServerArgs:
    """Translate, check and complete `rollout.sglang.server_args` (UserError when invalid).

    `num_experts`: the model's routed experts (None when unknown here, e.g. the checkpoint
    is only on the cluster; the redundant experts are then computed at launch).
    """
    gpus = config.rollout.gpus_per_engine
    args = normalize(config.rollout.sglang.server_args, "rollout.sglang.server_args")
    for name, why in OWNED_FLAGS.items():
        if name in args:
            raise UserError(f"{CLI_PREFIX}{name} is not yours to set: {why}")
    notes = _translate_seed_flags(args, gpus)
    for name, why in SINGLE_REPLICA_FLAGS.items():
        if name in args and int(args[name]) != 1:
            raise UserError(f"{CLI_PREFIX}{name} {args[name]}: only 1 is supported; {why}")
    _check_divides(args, "ep-size", gpus)
    _check_divides(args, "attn-dp-size", gpus)
    notes += _redundant_experts(args, num_experts)
    notes += _expert_balancing(args)
    notes += _dtype(args, config)
    notes += _routing_replay(args, config)
    if config.placement.colocate and not args.get("enable-memory-saver"):
        args["enable-memory-saver"] = True
        notes.append(
            f"{CLI_PREFIX}enable-memory-saver added: colocated engines release their GPU "
            f"memory while the trainers step"
        )
    return ResolvedServerArgs(args, tuple(notes))


def _routing_replay(args: dict[str, Any], config: SluiceConfig) -> list[str]:
    """Routing replay needs the server to record every token's experts."""
    if not config.algorithm.routing_replay:
        return []
    if args.get("enable-return-routed-experts") is False:
        raise UserError(
            f"{CLI_PREFIX}enable-return-routed-experts false: algorithm.routing_replay needs "
            f"the engines' routing; remove the flag, or turn routing replay off"
        )
    if args.get("enable-return-routed-experts"):
        return []
    args["enable-return-routed-experts"] = True
    return [
        f"{CLI_PREFIX}enable-return-routed-experts added: algorithm.routing_replay replays the "
        f"experts SGLang routed each token to"
    ]


def _dtype(args: dict[str, Any], config: SluiceConfig) -> list[str]:
    """The engine serves in the checkpoint's dtype unless `--sglang-dtype` says otherwise
    (not in `model.dtype`, whose default, float32, is the CPU's)."""
    notes = []
    if "dtype" not in args:
        stored = read_checkpoint_dtype(config)
        args["dtype"] = stored or "auto"
        source = "the checkpoint's config.json" if stored else "read by SGLang at launch"
        notes.append(f"--dtype {args['dtype']} ({source}); {CLI_PREFIX}dtype sets another")
    if args["dtype"] in ("float32", "float"):
        notes.append(
            f"--dtype {args['dtype']}: SGLang serves float32 at a fraction of bf16's speed and "
            f"twice its memory; {CLI_PREFIX}dtype bfloat16 for GPU runs"
        )
    if args["dtype"] not in ("auto", config.model.dtype):
        notes.append(
            f"the trainers send model.dtype={config.model.dtype} weights; SGLang casts them to "
            f"its {args['dtype']} as it loads them"
        )
    return notes


def _translate_seed_flags(args: dict[str, Any], gpus: int) -> list[str]:
    """Rewrite the seed's flags (older SGLang) into sglang 0.5.23's; one note per rewrite."""
    notes = []
    if args.pop("enable-ep-moe", False):
        if "ep-size" in args and int(args["ep-size"]) != gpus:
            raise UserError(
                f"{CLI_PREFIX}enable-ep-moe (expert parallelism over the engine's {gpus} GPUs) "
                f"contradicts {CLI_PREFIX}ep-size {args['ep-size']}; give only one"
            )
        args["ep-size"] = gpus
        notes.append(_renamed("enable-ep-moe", f"ep-size {gpus} (the engine's GPUs)"))
    if "cuda-graph-bs" in args:
        if "cuda-graph-bs-decode" in args:
            raise UserError(
                f"{CLI_PREFIX}cuda-graph-bs is the old name of {CLI_PREFIX}cuda-graph-bs-decode;"
                f" give only one of them"
            )
        args["cuda-graph-bs-decode"] = args.pop("cuda-graph-bs")
        notes.append(_renamed("cuda-graph-bs", "cuda-graph-bs-decode"))
    if args.pop("enable-dp-attention", False):
        if "dp-size" in args and "attn-dp-size" in args:
            raise UserError(
                f"{CLI_PREFIX}enable-dp-attention {CLI_PREFIX}dp-size is the old spelling of "
                f"{CLI_PREFIX}attn-dp-size; give only one of them"
            )
        if "attn-dp-size" in args:  # valid in sglang 0.5.23: the switch is implied
            notes.append(
                f"{CLI_PREFIX}enable-dp-attention is implied by {CLI_PREFIX}attn-dp-size in "
                f"sglang {sglang_version()}; passing --attn-dp-size {args['attn-dp-size']}"
            )
        elif "dp-size" in args:
            width = args.pop("dp-size")
            args["attn-dp-size"] = width
            old = f"enable-dp-attention {CLI_PREFIX}dp-size {width}"
            notes.append(_renamed(old, f"attn-dp-size {width}"))
        else:
            raise UserError(
                f"{CLI_PREFIX}enable-dp-attention needs the attention data-parallel width: "
                f"give {CLI_PREFIX}attn-dp-size N (sglang {sglang_version()}'s spelling)"
            )
    return notes


def _renamed(old: str, new: str) -> str:
    return f"{CLI_PREFIX}{old} is the seed's SGLang; passing --{new} to sglang {sglang_version()}"


def _check_divides(args: dict[str, Any], name: str, gpus: int) -> None:
    if name in args and gpus % int(args[name]):
        raise UserError(
            f"{CLI_PREFIX}{name} {args[name]} does not divide the engine's {gpus} GPUs "
            f"(rollout.gpus_per_engine); pick a divisor of {gpus}"
        )


def _redundant_experts(args: dict[str, Any], num_experts: int | None) -> list[str]:
    """SGLang needs (experts + redundant) divisible by ep-size; compute or check the count."""
    ep = int(args.get("ep-size", 1))
    given = args.get("ep-num-redundant-experts")
    if ep == 1 or (num_experts is None and given is not None):
        return []
    if num_experts is None:
        return [
            "expert count unknown here (the checkpoint's config.json is not readable on this "
            "machine): redundant experts are computed at launch, on the engine's node"
        ]
    if given is not None:
        total = num_experts + int(given)
        if total % ep:
            low = -num_experts % ep
            options = f"{low} ({(num_experts + low) // ep} per GPU) or {low + ep}"
            raise UserError(
                f"{CLI_PREFIX}ep-num-redundant-experts {given}: {num_experts} experts + {given} "
                f"= {total} do not divide over ep-size {ep}; use {options}"
            )
        return []
    needed = -num_experts % ep
    if needed == 0:
        return []
    args["ep-num-redundant-experts"] = needed
    per_gpu = (num_experts + needed) // ep
    return [
        f"{num_experts} experts do not divide over ep-size {ep}: adding {needed} redundant "
        f"experts ({num_experts + needed} = {per_gpu} per GPU; "
        f"{CLI_PREFIX}ep-num-redundant-experts sets another multiple)"
    ]


def _expert_balancing(args: dict[str, Any]) -> list[str]:
    """Redundant experts are used only when SGLang places them: turn EPLB on unless the user
    placed them (`init-expert-location`) or said `enable-eplb: false`."""
    redundant = int(args.get("ep-num-redundant-experts", 0))
    if redundant == 0 or args.get("init-expert-location", "trivial") != "trivial":
        return []
    if args.get("enable-eplb") is False:
        return [
            f"{CLI_PREFIX}enable-eplb false: the {redundant} redundant experts keep SGLang's "
            f"identity placement and serve no tokens (they only make the count divide)"
        ]
    if args.get("enable-eplb"):
        return []
    args["enable-eplb"] = True
    return [
        f"{CLI_PREFIX}enable-eplb added: the {redundant} redundant experts are copies of the "
        f"most loaded experts, which SGLang's EPLB picks from the routing it records and "
        f"re-picks every {CLI_PREFIX}eplb-rebalance-num-iterations (1000) forward passes; "
        f"without EPLB (or {CLI_PREFIX}init-expert-location) they would serve no tokens. "
        f"{CLI_PREFIX}enable-eplb false keeps them idle"
    ]


def read_num_experts(config: SluiceConfig) -> int | None:
    """Routed experts of the model (0 for a dense one); None when config.json is unreadable."""
    text_config = _read_text_config(config)
    if text_config is None:
        return None
    return next((int(text_config[k]) for k in EXPERT_COUNT_KEYS if text_config.get(k)), 0)


def read_checkpoint_dtype(config: SluiceConfig) -> str | None:
    """The checkpoint's weight dtype (`dtype`, or transformers 4's `torch_dtype`); None when
    config.json is unreadable or names none."""
    text_config = _read_text_config(config)
    if text_config is None:
        return None
    value = text_config.get("dtype") or text_config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def _read_text_config(config: SluiceConfig) -> dict[str, Any] | None:
    path = Path(config.model.hf_checkpoint) / "config.json"
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return hf_config.get("text_config", hf_config)


def check_sglang_config(config: SluiceConfig) -> None:
    """What can be refused before any actor starts."""
    if config.model.hf_checkpoint == BUILTIN_MODEL:
        raise UserError(
            f"rollout.engine=sglang serves a Hugging Face model directory; model.hf_checkpoint="
            f"{BUILTIN_MODEL} exists only in Sluice's memory (use rollout.engine=transformers)"
        )
    if config.weight_sync.verify:
        raise UserError(
            "weight_sync.verify compares per-tensor checksums, which SGLang's fused and sharded "
            "weights cannot give; set weight_sync.verify=false with rollout.engine=sglang"
        )
    resolve_server_args(config, read_num_experts(config))


def server_launches(
    config: SluiceConfig,
    layout: Layout,
    engine: int,
    resolved: ResolvedServerArgs,
    *,
    port: int | str,
    dist_init_port: int | str,
    gpu_ids: list[list[int | str]] | None = None,
) -> list[ServerLaunch]:
    """One launch per node engine `engine` spans (node_rank = position in the span order).

    `gpu_ids[k]`: the GPU ids Ray gave the engine's slots on its k-th node (the Placement's
    probe); default: the planned ids. They become the server's `CUDA_VISIBLE_DEVICES`, so
    its ranks use exactly those GPUs, in slot order, whatever else the node runs.
    `dist_init_port` is given to SGLang when the engine spans nodes or uses DP attention,
    which then also binds the next `DIST_INIT_PORTS - 1` ports (`free_port_block`).
    `port` / `dist_init_port` may be placeholders (strings) in a dry run.
    """
    if not layout.use_gpus:
        raise UserError(
            "rollout.engine=sglang runs on GPUs, and this plan has none (placement.use_gpus, or "
            "a cluster without GPUs); use rollout.engine=transformers here"
        )
    spans = layout.engine_spans(engine)
    sizes = {len(span.slots) for span in spans}
    if len(sizes) != 1:
        raise UserError(
            f"engine {engine} spans nodes with {sorted(len(s.slots) for s in spans)} GPUs; "
            f"SGLang needs the same number of GPUs on every node of an engine"
        )
    head = layout.nodes[spans[0].node_index]
    launches = []
    for rank, span in enumerate(spans):
        ids = tuple(gpu_ids[rank] if gpu_ids else [s.gpu_index for s in span.slots])
        node = layout.nodes[span.node_index]
        argv = [
            "--model-path",
            config.model.hf_checkpoint,
            "--tp-size",
            str(config.rollout.gpus_per_engine),
        ]
        if len(spans) > 1:
            argv += ["--nnodes", str(len(spans)), "--node-rank", str(rank)]
        if len(spans) > 1 or uses_dp_attention(resolved.args):
            argv += ["--dist-init-addr", f"{head.address}:{dist_init_port}"]
        argv += ["--host", "0.0.0.0", "--port", str(port)]
        args = dict(resolved.args)
        args.setdefault("random-seed", config.seed + engine)
        argv += as_argv(args)
        launches.append(
            ServerLaunch(
                engine=engine,
                node_rank=rank,
                nnodes=len(spans),
                node_index=span.node_index,
                address=node.address,
                gpu_ids=ids,
                visible_devices=",".join(str(g) for g in ids),
                argv=tuple(argv),
            )
        )
    return launches


def uses_dp_attention(args: dict[str, Any]) -> bool:
    return int(args.get("attn-dp-size", 1)) > 1


DIST_INIT_PORTS = 7
"""Ports from `--dist-init-addr`'s upward that SGLang 0.5.23 binds with DP attention (the
port itself for torch.distributed, then its ZMQ sockets at +1..+6; `PortArgs.init_new`)."""


def describe_engines(config: SluiceConfig, layout: Layout) -> str:
    """The dry run's SGLang section: notices, then every engine node's command line."""
    resolved = resolve_server_args(config, read_num_experts(config))
    lines = [f"SGLang engines (sglang {sglang_version()}, one server per engine node):"]
    lines += [f"note: {note}" for note in resolved.notes]
    for engine in range(config.rollout.num_engines):
        for launch in server_launches(
            config, layout, engine, resolved, port="PORT", dist_init_port="DIST_PORT"
        ):
            lines.append(f"engine {engine} node_rank {launch.node_rank} on {launch.address}:")
            lines.append(f"  {launch.command}")
    lines.append(
        f"PORT, DIST_PORT: free ports picked on the engine's first node at launch (with DP "
        f"attention, DIST_PORT to DIST_PORT+{DIST_INIT_PORTS - 1} are all free)"
    )
    return "\n".join(lines)
