"""The JSON bodies Sluice sends to an SGLang server, their routes, and the parsing of replies.

Written against sglang 0.5.23's HTTP server (`sglang/srt/entrypoints/http_server.py`) and its
request classes (`sglang/srt/managers/io_struct.py`), without importing sglang: the driver and the
actors that talk to the servers do not have it installed. `tests/test_sglang_requests.py` feeds
every body built here through the real classes the way the server does, so a renamed or retyped
field fails a test instead of being silently ignored (SGLang's request classes drop unknown keys).

Replies, as the server builds them:

- `/generate` with a batch of `input_ids` (a list of lists) answers a list with one entry per
  prompt, in input order: `{"text", "output_ids", "meta_info"}`, where `meta_info` holds `id`,
  `finish_reason` (`{"type": "stop", "matched": ...}`, `{"type": "length", "length": n}` or
  `{"type": "abort", "message", "status_code", "err_type"}`), `prompt_tokens`,
  `completion_tokens`, `weight_version` and, with `return_logprob`, `output_token_logprobs`: one
  `[logprob, token_id, text_or_null]` per generated token (the EOS that stopped it included).
- The weight endpoints answer `{"success": bool, "message": str}`, with HTTP 400 on failure.
- `/release_memory_occupation` and `/resume_memory_occupation` answer `null`; `/flush_cache`
  answers plain text; `/pause_generation` and `/continue_generation` `{"message", "status"}`.
- Errors come as `{"error": "..."}` (the `/generate` contract check), `{"error": {"message"}}`,
  `{"object": "error", "message", ...}` (validation) or plain text; `error_message` reads them all.
"""

import base64
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from inference.engine import Completion, SamplingParams, request_seed
from weights.manifest import Bucket
from weights.process_group import GroupInfo

if TYPE_CHECKING:
    from models.routing import RoutingShape

GENERATE = "/generate"
INIT_WEIGHTS_UPDATE_GROUP = "/init_weights_update_group"
UPDATE_WEIGHTS_FROM_DISTRIBUTED = "/update_weights_from_distributed"
UPDATE_WEIGHTS_FROM_TENSOR = "/update_weights_from_tensor"
DESTROY_WEIGHTS_UPDATE_GROUP = "/destroy_weights_update_group"
RELEASE_MEMORY_OCCUPATION = "/release_memory_occupation"
RESUME_MEMORY_OCCUPATION = "/resume_memory_occupation"
FLUSH_CACHE = "/flush_cache"
PAUSE_GENERATION = "/pause_generation"
CONTINUE_GENERATION = "/continue_generation"
BEGIN_WEIGHT_UPDATE = "/begin_weight_update"
END_WEIGHT_UPDATE = "/end_weight_update"
MODEL_INFO = "/model_info"
"""GET; its `weight_version` is the version the last weight update set."""
SERVER_INFO = "/server_info"
"""GET; its `version` is the server's SGLang version."""
HEALTH = "/health"
"""GET; 200 once the server serves requests."""
ABORT_REQUEST = "/abort_request"

FLATTENED_BUCKET = "flattened_bucket"
"""SGLang's `load_format` for one buffer holding a bucket's tensors back to back, our wire layout
(`weights.manifest.Bucket`)."""

MemoryTag = Literal["weights", "kv_cache", "cuda_graph"]
"""The GPU memory regions SGLang can release and resume (`sglang.srt.constants`)."""

PauseMode = Literal["abort", "retract", "in_place"]
"""`abort` returns running requests as aborted; `retract` requeues them (their KV cache may be
flushed and is recomputed); `in_place` freezes them with their KV cache (flush_cache then fails)."""

FINISH_REASONS = ("stop", "length")
"""The finish types a usable completion may have; `abort` raises."""


class SglangError(RuntimeError):
    """An SGLang server refused a request or answered something we cannot use.

    Not retried on another server: the same request would fail there too (a bad body, a
    weight manifest the model does not match, an aborted generation). The message names the
    request or the endpoint and the server's own reason.
    """


# --- /generate ---------------------------------------------------------------------------------


def generate_body(
    prompts: list[list[int]],
    params: SamplingParams,
    rids: list[str] | None = None,
    routed_experts: bool = False,
    first: int = 0,
) -> dict[str, Any]:
    """One `/generate` request for a batch of token-id prompts.

    Always a batch (a list of lists, even for one prompt) so the reply is always a list. Asks
    for the log-prob of each output token only (`logprob_start_len=-1`): SGLang returns them
    under the tempered, untruncated distribution (`log_softmax(logits / T)`, before top-p/top-k),
    which is what `Completion.log_probs` promises. `rids`, one per prompt, name the requests so
    that one given up on can be aborted (`abort_body`). `routed_experts` (routing replay) asks
    for every position's experts (`return_routed_experts`; the server must run with
    `--enable-return-routed-experts`). With `params.seed`, each prompt gets its own
    `sampling_seed`, `request_seed(params.seed, first + j)` for prompt j (`first`: the index of
    `prompts[0]` in the engine's call), so a request sent again draws the same seeds.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_body needs at least one prompt, and no empty prompt")
    if rids is not None and len(rids) != len(prompts):
        raise ValueError(f"{len(rids)} request ids for {len(prompts)} prompts")
    body = {
        "input_ids": [[int(t) for t in p] for p in prompts],
        "sampling_params": _per_prompt_sampling_params(params, len(prompts), first),
        "return_logprob": True,
        "logprob_start_len": -1,
    }
    if rids is not None:
        body["rid"] = list(rids)
    if routed_experts:
        body["return_routed_experts"] = True
    return body


def _per_prompt_sampling_params(params: SamplingParams, count: int, first: int) -> Any:
    """One `sampling_params` for the batch, or one per prompt when each has its own seed."""
    shared = sampling_params_body(params)
    if params.seed is None:
        return shared
    return [{**shared, "sampling_seed": request_seed(params.seed, first + j)} for j in range(count)]


def abort_body(rid: str) -> dict[str, Any]:
    """`/abort_request` for one request id (SGLang's `AbortReq` aborts one rid at a time)."""
    return {"rid": rid}


def sampling_params_body(params: SamplingParams) -> dict[str, Any]:
    """Our sampling settings as SGLang's `sampling_params`.

    Greedy is temperature 0 with top_k 1 (SGLang itself turns temperature 0 into top_k 1 and
    temperature 1; sending both makes the intent independent of that rule). Our `top_k=0`
    ("off") is SGLang's -1. The seed is per prompt (`generate_body`).
    """
    if params.greedy:
        temperature, top_p, top_k = 0.0, 1.0, 1
    else:
        temperature, top_p = float(params.temperature), float(params.top_p)
        top_k = params.top_k if params.top_k > 0 else -1
    return {
        "max_new_tokens": int(params.max_new_tokens),
        "temperature": temperature,
        "top_p": top_p,
        "top_k": int(top_k),
    }


def parse_generate_response(
    payload: Any, prompts: list[list[int]], routing: "RoutingShape | None" = None
) -> list[Completion]:
    """The completions of a batched `/generate` reply to `prompts`, in prompt order.

    Tokens and log-probs both come from `meta_info.output_token_logprobs`, which pairs them
    1:1; `output_ids` and `completion_tokens`, when present, must agree with it. With
    `routing` (routing replay), `meta_info.routed_experts` too: base64 of int32 expert ids,
    [prompt + completion - 1, num_hidden_layers, top_k] (SGLang's positions `[0, seqlen - 1)`,
    a slot for every decoder layer), of which the MoE layers' are kept. Raises
    `SglangError` on a wrong count, an aborted request, or a misaligned output.
    """
    expected = len(prompts)
    if not isinstance(payload, list):
        raise SglangError(
            f"{GENERATE} answered a {type(payload).__name__}, expected a list of {expected} "
            f"outputs (was the request a batch?)"
        )
    if len(payload) != expected:
        raise SglangError(f"{GENERATE} answered {len(payload)} outputs for {expected} prompts")
    completions = [_completion(item) for item in payload]
    if routing is not None:
        for item, prompt, done in zip(payload, prompts, completions, strict=True):
            done.routed_experts = _routed_experts(item["meta_info"], prompt, done, routing)
    return completions


def _routed_experts(
    meta: dict[str, Any], prompt: list[int], completion: Completion, routing: "RoutingShape"
) -> np.ndarray:
    rid = meta.get("id", "<no id>")
    encoded = meta.get("routed_experts")
    if not isinstance(encoded, str):
        raise SglangError(
            f"request {rid} has no routed_experts: routing replay needs the server started "
            f"with --enable-return-routed-experts (Sluice adds it when "
            f"algorithm.routing_replay is on) and return_routed_experts in the request"
        )
    ids = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
    positions = len(prompt) + len(completion.token_ids) - 1
    layers = routing.decoder_layers
    if ids.size != positions * layers * routing.top_k:
        raise SglangError(
            f"request {rid}: routed_experts holds {ids.size} ids, expected {positions} positions "
            f"x {layers} decoder layers ({routing.layers} of them MoE) x top-{routing.top_k}"
        )
    # SGLang's capturer keeps a slot per decoder layer (`num_hidden_layers`); a dense layer's
    # slot is never written, so only the MoE layers' slots are routing.
    per_layer = ids.reshape(positions, layers, routing.top_k)
    return per_layer[:, routing.moe_layer_index].astype(routing.dtype)


def _completion(item: Any) -> Completion:
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        raise SglangError(f"{GENERATE} output without meta_info: {_short(item)}")
    rid = meta.get("id", "<no id>")
    finish_reason = _finish_reason(meta, rid)
    tokens, log_probs = _output_logprobs(meta, rid)
    _check_aligned(item, meta, tokens, rid)
    version = _weight_version(meta, rid)
    return Completion(tokens, log_probs, finish_reason, weight_version=version)


CHECKPOINT_WEIGHTS = "default"
"""The `weight_version` a server reports before any weight update (SGLang's `--weight-version`
default; Sluice sets none at launch): the checkpoint's weights, Sluice's version 0."""


def _weight_version(meta: dict[str, Any], rid: str) -> int:
    """The weight version that generated a reply: the oldest of its `weight_versions` spans when
    SGLang changed weights while generating it (the staleness bound is about the oldest token),
    else its `weight_version`. Sluice's weight updates set the version as a decimal string."""
    spans = meta.get("weight_versions")
    if isinstance(spans, list) and spans:
        names = [span.get("version") if isinstance(span, dict) else None for span in spans]
    else:
        names = [meta.get("weight_version")]
    versions = []
    for name in names:
        if name == CHECKPOINT_WEIGHTS:
            versions.append(0)
        elif isinstance(name, str) and name.isdigit():
            versions.append(int(name))
        else:
            raise SglangError(
                f"request {rid}: weight_version {name!r} is not one Sluice set (a whole number, "
                f"or {CHECKPOINT_WEIGHTS!r} before the first update)"
            )
    return min(versions)


def _finish_reason(meta: dict[str, Any], rid: str) -> str:
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else None
    if kind == "abort":
        raise SglangError(
            f"request {rid} was aborted by the engine: {reason.get('message') or 'no message'} "
            f"(status {reason.get('status_code')}, {reason.get('err_type')})"
        )
    if kind not in FINISH_REASONS:
        raise SglangError(f"request {rid} has no usable finish_reason: {reason!r}")
    return kind


def _output_logprobs(meta: dict[str, Any], rid: str) -> tuple[list[int], list[float]]:
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise SglangError(
            f"request {rid} has no output_token_logprobs (the body must set return_logprob)"
        )
    tokens, log_probs = [], []
    for position, entry in enumerate(entries):
        if not _is_logprob_entry(entry):
            raise SglangError(
                f"request {rid}: output_token_logprobs[{position}] is {entry!r}, "
                f"expected [logprob, token_id, text]"
            )
        log_probs.append(float(entry[0]))
        tokens.append(int(entry[1]))
    return tokens, log_probs


def _is_logprob_entry(entry: Any) -> bool:
    return (
        isinstance(entry, list | tuple)
        and len(entry) >= 2
        and isinstance(entry[0], int | float)
        and not isinstance(entry[0], bool)
        and isinstance(entry[1], int)
        and not isinstance(entry[1], bool)
    )


def _check_aligned(item: dict[str, Any], meta: dict[str, Any], tokens: list[int], rid: str):
    output_ids = item.get("output_ids")
    if output_ids is not None and list(output_ids) != tokens:
        raise SglangError(
            f"request {rid}: output_ids ({len(output_ids)} tokens) differ from the "
            f"{len(tokens)} tokens of output_token_logprobs"
        )
    completion_tokens = meta.get("completion_tokens")
    if completion_tokens is not None and completion_tokens != len(tokens):
        raise SglangError(
            f"request {rid}: completion_tokens is {completion_tokens} but "
            f"output_token_logprobs has {len(tokens)} entries"
        )


# --- weight and memory endpoints ---------------------------------------------------------------


def init_weights_update_group_body(info: GroupInfo, rank_offset: int) -> dict[str, Any]:
    """`/init_weights_update_group`: join the trainer's broadcast group as `rank_offset` (plus
    each TP worker's local rank). SGLang takes no timeout here; `info.timeout_s` is ours."""
    return {
        "master_address": info.master_address,
        "master_port": int(info.master_port),
        "rank_offset": int(rank_offset),
        "world_size": int(info.world_size),
        "group_name": info.group_name,
        "backend": info.backend,
    }


def update_weights_from_distributed_body(
    bucket: Bucket, group_name: str, *, flush_cache: bool, weight_version: str | None
) -> dict[str, Any]:
    """`/update_weights_from_distributed`: receive one bucket as one flat broadcast buffer.

    `flush_cache` drops the radix cache after loading (KV computed with old weights); pass it
    on the last bucket of a sync only. `weight_version` is what `/generate` then reports.
    """
    return {
        "names": bucket.names,
        "dtypes": bucket.dtypes,
        "shapes": bucket.shapes,
        "group_name": group_name,
        "load_format": FLATTENED_BUCKET,
        "flush_cache": flush_cache,
        "weight_version": weight_version,
    }


def update_weights_from_tensor_body(
    serialized_named_tensors: list[str],
    *,
    load_format: str | None,
    flush_cache: bool,
    weight_version: str | None,
) -> dict[str, Any]:
    """`/update_weights_from_tensor`: tensors shared through CUDA IPC handles, same node only.

    One base64 text per TP rank (SGLang's `MultiprocessingSerializer` output), since JSON has no
    bytes; each rank decodes its own entry.
    """
    return {
        "serialized_named_tensors": list(serialized_named_tensors),
        "load_format": load_format,
        "flush_cache": flush_cache,
        "weight_version": weight_version,
    }


def begin_weight_update_body() -> dict[str, Any]:
    """`/begin_weight_update`: open the session every `update_weights_from_*` call of sglang
    0.5.23 must run in (outside one, the server refuses the call without receiving the
    broadcast, which would leave the trainer waiting); all runners (target and draft)."""
    return {"selector": "all"}


def end_weight_update_body() -> dict[str, Any]:
    """`/end_weight_update`: close the session, finalizing the loaded weights."""
    return {}


def destroy_weights_update_group_body(group_name: str) -> dict[str, Any]:
    """`/destroy_weights_update_group`: leave the broadcast group."""
    return {"group_name": group_name}


def release_memory_occupation_body(tags: list[MemoryTag] | None = None) -> dict[str, Any]:
    """`/release_memory_occupation`: free GPU memory (all regions when `tags` is None) so a
    trainer sharing the GPU can use it. Answers `null`."""
    return {"tags": list(tags) if tags is not None else None}


def resume_memory_occupation_body(tags: list[MemoryTag] | None = None) -> dict[str, Any]:
    """`/resume_memory_occupation`: take back what `release_memory_occupation` freed."""
    return {"tags": list(tags) if tags is not None else None}


def flush_cache_body() -> dict[str, Any]:
    """`/flush_cache` (POST or GET): drop the radix cache.

    The route reads no body (only an optional `timeout` query parameter), so this is empty. The
    server answers plain text, with HTTP 400 while requests are still running.
    """
    return {}


def pause_generation_body(mode: PauseMode = "abort") -> dict[str, Any]:
    """`/pause_generation`: stop scheduling generation, e.g. around a weight update."""
    return {"mode": mode}


def continue_generation_body() -> dict[str, Any]:
    """`/continue_generation`: resume after `pause_generation` (SGLang's defaults)."""
    return {}


def parse_success(payload: Any, what: str) -> str:
    """The message of a `{"success": bool, "message": str}` reply; raises on `success: false`."""
    if not isinstance(payload, dict) or "success" not in payload:
        raise SglangError(f"{what}: unexpected reply {_short(payload)}")
    message = str(payload.get("message", ""))
    if payload["success"] is not True:
        raise SglangError(f"{what} failed: {message or 'no message'}")
    return message


def error_message(payload: Any) -> str:
    """The server's reason in an error reply, whichever of SGLang's error shapes it has."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if error is not None:
            return str(error)
        if "message" in payload:
            return str(payload["message"])
        if "detail" in payload:
            return str(payload["detail"])
    if isinstance(payload, str):
        return payload.strip()
    return _short(payload)


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
