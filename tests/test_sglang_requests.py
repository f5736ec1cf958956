"""Our SGLang request bodies against sglang 0.5.23's own request classes, and reply parsing.

Each body goes where the server puts it: FastAPI validates the decoded JSON into the route's
class with pydantic (`TypeAdapter(cls).validate_python`), `/generate` then runs the JSON
contract check (`generate_contract_error`), and the tokenizer manager normalises the batch and
builds `SamplingParams(**sampling_params)`, then `normalize` and `verify(vocab_size)`. SGLang's
request classes ignore unknown keys, so every test also checks that each key we send is a field.

The replies are built here the way `TokenizerManager._handle_batch_output` builds them (field
names read in sglang 0.5.23; its module needs fastapi, absent here), with SGLang's own finish
reason classes, then sent through a JSON round trip as the server does.
"""

import dataclasses
import json
import warnings
from pathlib import Path

import msgspec
import pytest

from inference.engine import Completion, SamplingParams
from inference.sglang import requests as req
from inference.sglang.requests import SglangError
from weights.manifest import Bucket, TensorSpec
from weights.process_group import GroupInfo

pytestmark = pytest.mark.sglang

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from pydantic import TypeAdapter
    from sglang.srt.managers import io_struct
    from sglang.srt.managers.schedule_batch import (
        FINISH_ABORT,
        FINISH_LENGTH,
        FINISH_MATCHED_TOKEN,
    )
    from sglang.srt.sampling import sampling_params as sglang_sampling

    try:  # sglang 0.5.23's own check of a /generate body; 0.5.17 has none
        from sglang.srt.entrypoints.api_contract import generate_contract_error
    except ImportError:
        generate_contract_error = None

VOCAB_SIZE = 1000


def validate(cls: type, body: dict):
    """What FastAPI does with a JSON body for a route taking `cls`; also: no key is dropped."""
    if dataclasses.is_dataclass(cls):
        fields = {f.name for f in dataclasses.fields(cls)}
    else:
        fields = {f.name for f in msgspec.structs.fields(cls)}
    assert set(body) <= fields, f"{cls.__name__} would ignore {set(body) - fields}"
    return TypeAdapter(cls).validate_python(json.loads(json.dumps(body)))


def sglang_sampling_params(sp: dict) -> sglang_sampling.SamplingParams:
    """What the tokenizer manager builds from one request's `sampling_params`."""
    params = sglang_sampling.SamplingParams(**sp)
    params.normalize(None)
    params.verify(VOCAB_SIZE)
    return params


def admitted_generate(body: dict) -> io_struct.GenerateReqInput:
    """The `/generate` route: pydantic, the contract check, then batch normalisation."""
    obj = validate(io_struct.GenerateReqInput, body)
    if generate_contract_error is not None:
        assert generate_contract_error(json.loads(json.dumps(body))) is None
    obj.normalize_batch_and_arguments()
    return obj


# --- /generate bodies --------------------------------------------------------------------------


def test_generate_body_sampling():
    prompts = [[1, 2, 3], [4, 5]]
    body = req.generate_body(prompts, SamplingParams(16, temperature=0.7, top_p=0.9, top_k=50))
    obj = admitted_generate(body)
    assert not obj.is_single and obj.batch_size == 2
    assert obj.input_ids == prompts and obj.text is None and not obj.stream
    assert obj.return_logprob == [True, True]
    assert obj.logprob_start_len == [-1, -1]  # output tokens only
    assert obj.top_logprobs_num == [0, 0] and obj.return_text_in_logprobs is False
    sp = sglang_sampling_params(obj.sampling_params[0])
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k) == (16, 0.7, 0.9, 50)
    assert sp.sampling_seed is None and sp.n == 1


def test_generate_body_sends_a_seed_per_prompt():
    """Prompt j of a request starting at prompt `first` of the engine's call gets the seed
    `request_seed(seed, first + j)`: SGLang takes one `sampling_seed` per request."""
    from inference.engine import request_seed

    params = SamplingParams(8, temperature=1.0, seed=2**31 - 1)
    body = req.generate_body([[1, 2], [1, 2], [1, 2]], params, first=6)
    obj = admitted_generate(body)
    seeds = [sglang_sampling_params(sp).sampling_seed for sp in obj.sampling_params]
    assert seeds == [request_seed(2**31 - 1, i) for i in (6, 7, 8)]
    assert len(set(seeds)) == 3 and max(seeds) < 2**63  # within SGLang's int64 check
    assert seeds != [request_seed(2**31 - 2, i) for i in (6, 7, 8)]
    unseeded = admitted_generate(req.generate_body([[1, 2]], SamplingParams(8)))
    assert sglang_sampling_params(unseeded.sampling_params[0]).sampling_seed is None


def test_generate_body_top_k_off_is_whole_vocabulary():
    body = req.generate_body([[7]], SamplingParams(4, temperature=1.0, top_k=0))
    assert body["sampling_params"]["top_k"] == -1
    sp = sglang_sampling_params(admitted_generate(body).sampling_params[0])
    assert sp.top_k == sglang_sampling.TOP_K_ALL and sp.temperature == 1.0 and sp.top_p == 1.0


def test_generate_body_greedy():
    body = req.generate_body([[7, 8]], SamplingParams(4, temperature=0.3, top_p=0.5, greedy=True))
    assert body["sampling_params"]["temperature"] == 0.0
    sp = sglang_sampling_params(admitted_generate(body).sampling_params[0])
    # SGLang's greedy: top_k 1, temperature reset to 1 (no division by zero); top_p unused.
    assert (sp.top_k, sp.temperature, sp.top_p) == (1, 1.0, 1.0)
    # SGLang reaches the same from temperature 0 alone, so both spellings agree.
    assert sglang_sampling_params({"temperature": 0.0, "top_k": -1}).top_k == 1


def test_generate_body_refuses_empty_prompts():
    with pytest.raises(ValueError):
        req.generate_body([], SamplingParams(4))
    with pytest.raises(ValueError):
        req.generate_body([[1], []], SamplingParams(4))


@pytest.mark.skipif(
    generate_contract_error is None, reason="this sglang (before 0.5.23) has no contract check"
)
def test_contract_check_is_live():
    """The contract check rejects what pydantic would let through, so the tests above mean it."""
    body = req.generate_body([[1]], SamplingParams(4))
    body["sampling_params"]["sampling_sed"] = 1
    assert "unknown field `sampling_sed`" in generate_contract_error(body)


# --- weight and memory bodies ------------------------------------------------------------------


def test_init_weights_update_group_body():
    info = GroupInfo("10.0.0.2", 29500, world_size=5, group_name="g1", backend="nccl")
    obj = validate(
        io_struct.InitWeightsUpdateGroupReqInput, req.init_weights_update_group_body(info, 3)
    )
    assert (obj.master_address, obj.master_port) == ("10.0.0.2", 29500)
    assert (obj.rank_offset, obj.world_size, obj.group_name, obj.backend) == (3, 5, "g1", "nccl")


def test_update_weights_from_distributed_body():
    bucket = Bucket(
        (TensorSpec("a.weight", "bfloat16", (3, 2)), TensorSpec("b.bias", "float32", ())), 16
    )
    body = req.update_weights_from_distributed_body(
        bucket, "g1", flush_cache=False, weight_version="7"
    )
    obj = validate(io_struct.UpdateWeightsFromDistributedReqInput, body)
    assert obj.names == ["a.weight", "b.bias"]
    assert obj.dtypes == ["bfloat16", "float32"] and obj.shapes == [[3, 2], []]
    assert (obj.group_name, obj.load_format) == ("g1", "flattened_bucket")
    assert (obj.flush_cache, obj.weight_version, obj.abort_all_requests) == (False, "7", False)
    last = req.update_weights_from_distributed_body(
        bucket, "g1", flush_cache=True, weight_version=None
    )
    obj = validate(io_struct.UpdateWeightsFromDistributedReqInput, last)
    assert obj.flush_cache is True and obj.weight_version is None


def test_update_weights_from_tensor_body():
    import base64

    payloads = [base64.b64encode(b"rank0").decode(), base64.b64encode(b"rank1").decode()]
    body = req.update_weights_from_tensor_body(
        payloads, load_format="flattened_bucket", flush_cache=True, weight_version="3"
    )
    obj = validate(io_struct.UpdateWeightsFromTensorReqInput, body)
    assert obj.serialized_named_tensors == [b"rank0", b"rank1"]  # decoded from base64
    assert (obj.load_format, obj.flush_cache, obj.weight_version) == ("flattened_bucket", True, "3")


def test_memory_cache_and_pause_bodies():
    release = validate(
        io_struct.ReleaseMemoryOccupationReqInput, req.release_memory_occupation_body(["kv_cache"])
    )
    assert release.tags == ["kv_cache"]
    assert (
        validate(io_struct.ResumeMemoryOccupationReqInput, req.resume_memory_occupation_body()).tags
        is None
    )
    destroy = validate(
        io_struct.DestroyWeightsUpdateGroupReqInput, req.destroy_weights_update_group_body("g1")
    )
    assert destroy.group_name == "g1"
    # /flush_cache takes no body (only a `timeout` query): sglang's own route says so.
    assert route_parameters("/flush_cache") == ["timeout"] and req.flush_cache_body() == {}
    pause = validate(io_struct.PauseGenerationReqInput, req.pause_generation_body("retract"))
    assert pause.mode == "retract"
    assert validate(io_struct.PauseGenerationReqInput, req.pause_generation_body()).mode == "abort"
    validate(io_struct.ContinueGenerationReqInput, req.continue_generation_body())
    from sglang.srt.constants import GPU_MEMORY_ALL_TYPES

    assert set(req.MemoryTag.__args__) == set(GPU_MEMORY_ALL_TYPES)


def route_parameters(path: str) -> list[str]:
    """The parameters of the function serving `path` in sglang's http_server.py, read from its
    source (the module itself needs uvicorn and more to import)."""
    import ast
    import importlib.util

    source = importlib.util.find_spec("sglang.srt.entrypoints.http_server").origin
    tree = ast.parse(Path(source).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            paths = [
                d.args[0].value
                for d in node.decorator_list
                if isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Constant)
            ]
            if path in paths:
                return [a.arg for a in node.args.args]
    raise AssertionError(f"no route {path} in {source}")


def test_generate_with_request_ids_and_their_abort():
    """A group's prompts go out under ids the client can abort one by one (AbortReq)."""
    rids = ["sluice-ab12-0", "sluice-ab12-1"]
    obj = admitted_generate(req.generate_body([[5, 6], [7]], SamplingParams(4), rids))
    assert obj.rid == rids
    abort = validate(io_struct.AbortReq, req.abort_body(rids[1]))
    assert (abort.rid, abort.abort_all) == (rids[1], False)
    assert route_parameters(req.ABORT_REQUEST)[0] == "obj"  # the route takes an AbortReq body
    with pytest.raises(ValueError, match="2 request ids for 1 prompts"):
        req.generate_body([[5]], SamplingParams(4), rids)


def test_parse_success():
    assert req.parse_success({"success": True, "message": "ok"}, "update") == "ok"
    with pytest.raises(SglangError, match="update failed: names mismatch"):
        req.parse_success({"success": False, "message": "names mismatch"}, "update")
    with pytest.raises(SglangError, match="unexpected reply"):
        req.parse_success(None, "update")


def test_error_message_reads_each_sglang_shape():
    assert req.error_message({"error": "unknown field `x`"}) == "unknown field `x`"
    assert req.error_message({"error": {"message": "too long"}}) == "too long"
    assert req.error_message({"object": "error", "message": "bad", "code": 400}) == "bad"
    assert req.error_message({"success": False, "message": "no group"}) == "no group"
    assert req.error_message("Flush cache failed.\n") == "Flush cache failed."


# --- /generate replies -------------------------------------------------------------------------


def sglang_output(rid: str, tokens: list[int], logprobs: list[float], finish) -> dict:
    """One entry of a batched `/generate` reply, as `_handle_batch_output` builds it."""
    meta_info = {
        "id": rid,
        "finish_reason": finish.to_json(),
        "prompt_tokens": 3,
        "weight_version": "default",
        "num_retractions": 0,
        # add_logprob_to_meta_info: detokenize_logprob_tokens gives (logprob, id, None) tuples
        "input_token_logprobs": [],
        "output_token_logprobs": [(lp, t, None) for lp, t in zip(logprobs, tokens, strict=True)],
        "output_token_logprobs_length": len(tokens),
        "reasoning_tokens": 0,
        "completion_tokens": len(tokens),
        "cached_tokens": 0,
    }
    return {"text": "decoded", "output_ids": list(tokens), "meta_info": meta_info}


def over_the_wire(outputs: list[dict]):
    """The server's JSON encoding: tuples become lists."""
    return json.loads(json.dumps(outputs))


def test_parse_generate_response():
    payload = over_the_wire(
        [
            sglang_output("r0", [11, 12, 2], [-0.5, -1.25, -0.01], FINISH_MATCHED_TOKEN(matched=2)),
            sglang_output("r1", [13, 14], [-2.0, -0.75], FINISH_LENGTH(length=2)),
        ]
    )
    assert req.parse_generate_response(payload, [[1, 2, 3]] * 2) == [
        Completion([11, 12, 2], [-0.5, -1.25, -0.01], "stop", weight_version=0),
        Completion([13, 14], [-2.0, -0.75], "length", weight_version=0),
    ]


def test_parse_generate_response_reads_each_replys_weight_version():
    """The version the answering server reports: Sluice's decimal versions, SGLang's "default"
    before any update (version 0), and the oldest span when the weights changed mid-request
    (spans as sglang 0.5.23's tokenizer manager adds them)."""
    from sglang.srt.utils.weight_versions import (
        WeightVersionEvent,
        add_weight_versions_to_meta_info,
        compute_weight_version_spans,
    )

    def reply(version: str, events=()) -> dict:
        out = sglang_output("r0", [5, 6, 7], [-0.1] * 3, FINISH_LENGTH(length=3))
        out["meta_info"]["weight_version"] = version
        if events:
            spans = compute_weight_version_spans(list(events), version, 3)
            add_weight_versions_to_meta_info(out["meta_info"], spans, num_output_tokens=3)
        return over_the_wire([out])

    def version_of(payload) -> int:
        return req.parse_generate_response(payload, [[1, 2]])[0].weight_version

    assert version_of(reply("7")) == 7
    assert version_of(reply("default")) == 0
    changed = reply("8", [WeightVersionEvent(old_version="7", num_output_tokens=2)])
    assert [s["version"] for s in changed[0]["meta_info"]["weight_versions"]] == ["7", "8"]
    assert version_of(changed) == 7
    with pytest.raises(SglangError, match="weight_version 'v2' is not one Sluice set"):
        version_of(reply("v2"))


def test_parse_generate_response_refuses_abort():
    aborted = FINISH_ABORT(message="Abort all requests", status_code=None)
    payload = over_the_wire([sglang_output("rid-9", [5], [-0.1], aborted)])
    with pytest.raises(SglangError, match=r"request rid-9 was aborted.*Abort all requests"):
        req.parse_generate_response(payload, [[1, 2, 3]] * 1)


def test_parse_generate_response_refuses_mismatches():
    good = sglang_output("r0", [1, 2], [-0.1, -0.2], FINISH_LENGTH(length=2))
    with pytest.raises(SglangError, match="answered 1 outputs for 2 prompts"):
        req.parse_generate_response(over_the_wire([good]), [[1, 2, 3]] * 2)
    with pytest.raises(SglangError, match="expected a list"):
        req.parse_generate_response(over_the_wire(good), [[1, 2, 3]] * 1)

    shifted = over_the_wire([good])
    shifted[0]["output_ids"] = [1, 2, 3]
    with pytest.raises(SglangError, match=r"request r0: output_ids \(3 tokens\) differ"):
        req.parse_generate_response(shifted, [[1, 2, 3]] * 1)

    miscounted = over_the_wire([good])
    miscounted[0]["meta_info"]["completion_tokens"] = 5
    with pytest.raises(SglangError, match="request r0: completion_tokens is 5"):
        req.parse_generate_response(miscounted, [[1, 2, 3]] * 1)

    no_logprobs = over_the_wire([good])
    del no_logprobs[0]["meta_info"]["output_token_logprobs"]
    with pytest.raises(SglangError, match="no output_token_logprobs"):
        req.parse_generate_response(no_logprobs, [[1, 2, 3]] * 1)

    unfinished = over_the_wire([good])
    unfinished[0]["meta_info"]["finish_reason"] = None
    with pytest.raises(SglangError, match="no usable finish_reason"):
        req.parse_generate_response(unfinished, [[1, 2, 3]] * 1)


# --- routing replay ----------------------------------------------------------------------------


def test_generate_body_asks_for_routed_experts_only_with_routing_replay():
    body = req.generate_body([[1, 2, 3]], SamplingParams(4), routed_experts=True)
    obj = admitted_generate(body)
    assert obj.return_routed_experts is True and obj[0].return_routed_experts is True
    assert "return_routed_experts" not in req.generate_body([[1, 2, 3]], SamplingParams(4))


def routed_output(prompt: list[int], tokens: list[int], experts):
    """A reply entry with routed experts as the tokenizer manager encodes them: base64 of the
    int32 [seqlen - 1, layers, top_k] tensor's bytes."""
    import pybase64
    import torch

    out = sglang_output("r0", tokens, [-0.5] * len(tokens), FINISH_LENGTH(length=len(tokens)))
    tensor = torch.tensor(experts, dtype=torch.int32)
    out["meta_info"]["routed_experts"] = pybase64.b64encode(tensor.numpy().tobytes()).decode()
    return out


def test_parse_generate_response_reads_routed_experts():
    import numpy as np
    from sglang.srt.state_capturer.routed_experts import extract_routed_experts_from_meta_info

    from models.routing import RoutingShape

    shape = RoutingShape(layers=2, top_k=2, num_experts=128)
    prompt, tokens = [1, 2, 3], [11, 12]
    experts = np.arange(4 * 2 * 2).reshape(4, 2, 2) % 128  # 3 + 2 - 1 positions
    payload = over_the_wire([routed_output(prompt, tokens, experts)])
    (completion,) = req.parse_generate_response(payload, [prompt], shape)
    assert completion.routed_experts.dtype == np.uint8
    np.testing.assert_array_equal(completion.routed_experts, experts)
    # SGLang's own decoder reads the same ids
    decoded = extract_routed_experts_from_meta_info(payload[0])
    np.testing.assert_array_equal(decoded, experts.ravel())

    short = over_the_wire([routed_output(prompt, tokens, experts[:3])])
    with pytest.raises(SglangError, match="holds 12 ids, expected 4 positions x 2 decoder layers"):
        req.parse_generate_response(short, [prompt], shape)
    missing = over_the_wire([routed_output(prompt, tokens, experts)])
    del missing[0]["meta_info"]["routed_experts"]
    with pytest.raises(SglangError, match="--enable-return-routed-experts"):
        req.parse_generate_response(missing, [prompt], shape)


def sglang_routed_experts(num_hidden_layers: int, moe_layers: dict[int, list], prompt_len: int):
    """`meta_info.routed_experts` as sglang 0.5.23 builds it, through its own capturer classes:
    a device buffer with a slot per decoder layer (`RoutedExpertsCapturer` sizes it with
    `num_hidden_layers`), written by each MoE layer's `TopK` under its decoder-layer id, copied to
    the host buffer by KV slot per forward (`on_forward_end`), read back for positions
    `[0, seqlen - 1)` (`get_topk`), base64 of the int32 bytes (the detokenizer's
    `_b64_encode_per_request`). `moe_layers[layer]` holds that layer's [positions, top_k] ids;
    forward 0 is the prefill of the prompt, each later one feeds one generated token."""
    import types

    import pybase64
    import torch
    from sglang.srt.state_capturer.base import BaseDeviceCache, BaseTopkCapturer

    first = next(iter(moe_layers.values()))
    positions, top_k = len(first), len(first[0])
    capturer = object.__new__(BaseTopkCapturer)  # (its host cache pins memory through CUDA)
    capturer.num_layers, capturer.topk_size = num_hidden_layers, top_k
    capturer.device_cache = BaseDeviceCache(16, num_hidden_layers, top_k, "cpu", "routed_experts")
    capturer.host_cache = types.SimpleNamespace(
        buffer=torch.zeros(64, num_hidden_layers, top_k, dtype=torch.int32)
    )
    slots = torch.arange(64)  # the request's KV slot of each position
    forwards = [(0, prompt_len)] + [(p, p + 1) for p in range(prompt_len, positions)]
    for start, end in forwards:
        for layer, ids in moe_layers.items():
            capturer.capture(layer, torch.tensor(ids[start:end], dtype=torch.int32))
        batch = types.SimpleNamespace(out_cache_loc=slots[start:end], out_cache_loc_virtual=None)
        capturer.on_forward_end(batch, can_run_graph=False, cuda_graph_batch=None)
    pool = types.SimpleNamespace(req_to_token=slots.view(1, -1))
    topk = capturer.get_topk(0, positions + 1, pool)
    assert tuple(topk.shape) == (positions, num_hidden_layers, top_k)
    return pybase64.b64encode(topk.numpy().tobytes()).decode("utf-8")


def test_routed_experts_are_read_per_decoder_layer_and_mapped_to_moe_layers():
    """A Qwen3-MoE with a dense first layer (`mlp_only_layers: [0]`): SGLang's buffer holds a
    slot for each of the 3 decoder layers, Sluice keeps those of MoE layers 1 and 2."""
    import numpy as np
    from transformers import Qwen3MoeConfig

    from models.routing import routing_shape

    config = Qwen3MoeConfig(
        num_hidden_layers=3, mlp_only_layers=[0], num_experts=8, num_experts_per_tok=2
    )
    shape = routing_shape(config)
    assert (shape.layers, shape.decoder_layers, shape.moe_layer_index) == (2, 3, [1, 2])
    prompt, tokens = [1, 2, 3], [11, 12, 13]
    rng = np.random.default_rng(0)
    experts = {layer: rng.integers(0, 8, size=(5, 2)).tolist() for layer in (1, 2)}
    out = sglang_output("r0", tokens, [-0.5] * 3, FINISH_LENGTH(length=3))
    out["meta_info"]["routed_experts"] = sglang_routed_experts(3, experts, len(prompt))
    (completion,) = req.parse_generate_response(over_the_wire([out]), [prompt], shape)
    expected = np.stack([experts[1], experts[2]], axis=1)  # [positions, MoE layers, top_k]
    np.testing.assert_array_equal(completion.routed_experts, expected)
    assert completion.routed_experts.dtype == np.uint8
