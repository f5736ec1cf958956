"""From rollouts to micro-batches: token balancing across ranks, the versioned Arrow schema and
its zero-copy path through the object store, and padding / splitting into micro-batches."""

import pickle
import random

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from data.balance import balance_by_tokens
from data.schema import (
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    VERSION_KEY,
    RolloutBatchRef,
    build_rollout_batch,
    check_schema,
    ragged,
)
from models.routing import RoutingShape
from training.batch import (
    Rows,
    pad_micro_batch,
    response_log_probs,
    rows_of,
    split_by_token_budget,
)

# --- balance_by_tokens ----------------------------------------------------------------------


def refs(token_counts: list[int]) -> list[RolloutBatchRef]:
    """Batch references with stand-in object refs (the balancer never dereferences them)."""
    return [
        RolloutBatchRef(ref=f"batch-{i}", num_samples=8, num_tokens=n, num_loss_tokens=n // 2)
        for i, n in enumerate(token_counts)
    ]


def loads(shares: list[list[RolloutBatchRef]]) -> list[int]:
    return [sum(b.num_tokens for b in share) for share in shares]


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", range(5))
def test_balance_assigns_every_batch_once_and_evens_the_load(num_ranks, seed):
    rng = random.Random(seed)
    batches = refs([rng.randint(1, 500) for _ in range(rng.randint(num_ranks, 40))])
    shares = balance_by_tokens(batches, num_ranks)
    assert len(shares) == num_ranks
    assigned = sorted(b.ref for share in shares for b in share)
    assert assigned == sorted(b.ref for b in batches)  # each exactly once, none invented
    rank_loads = loads(shares)
    assert max(rank_loads) - min(rank_loads) <= max(b.num_tokens for b in batches)


def test_balance_is_deterministic():
    batches = refs([random.Random(7).randint(1, 100) for _ in range(30)])
    first = balance_by_tokens(batches, 4)
    assert all(balance_by_tokens(batches, 4) == first for _ in range(3))


def test_balance_breaks_ties_towards_the_lower_rank():
    shares = balance_by_tokens(refs([10, 10, 10]), 3)
    assert [[b.ref for b in share] for share in shares] == [["batch-0"], ["batch-1"], ["batch-2"]]


def test_balance_with_fewer_batches_than_ranks_leaves_some_ranks_empty():
    shares = balance_by_tokens(refs([30, 70]), 4)
    assert [[b.ref for b in share] for share in shares] == [["batch-1"], ["batch-0"], [], []]
    assert balance_by_tokens([], 3) == [[], [], []]


def test_balance_puts_big_batches_first():
    # Largest-first greedy gets the perfect split here; arrival order would give 9 vs 6.
    assert sorted(loads(balance_by_tokens(refs([1, 2, 3, 4, 5]), 2))) == [7, 8]


# --- the Arrow rollout schema ---------------------------------------------------------------


def columns_of(rows: list[dict]) -> dict[str, list]:
    return {field.name: [row[field.name] for row in rows] for field in ROLLOUT_SCHEMA}


def sample_row(prompt, response, log_probs, mask, advantage, group=0, index=0) -> dict:
    return {
        "prompt_ids": prompt,
        "response_ids": response,
        "rollout_log_probs": log_probs,
        "loss_mask": mask,
        "turn_starts": [0],
        "reward": 1.0 if advantage > 0 else 0.0,
        "advantage": advantage,
        "group_id": group,
        "sample_index": index,
        "weight_version": 3,
        "finish_reason": "stop" if mask[-1] else "length",
        "routed_experts": None,
    }


# Two rows checked by hand in test_pad_micro_batch_aligns_response_tokens.
ROW_A = sample_row([5, 6, 7], [8, 9], [-0.5, -0.25], [1, 1], 1.0, index=0)
ROW_B = sample_row([5], [3, 4, 2], [-1.0, -2.0, -3.0], [1, 1, 0], -0.5, index=1)
ROW_C = sample_row([4, 4], [1], [-0.125], [1], 0.25, group=1)


def test_build_rollout_batch_round_trips_every_column():
    columns = columns_of([ROW_A, ROW_B, ROW_C])
    batch = build_rollout_batch(columns)
    assert batch.schema.equals(ROLLOUT_SCHEMA, check_metadata=True)
    assert batch.num_rows == 3
    assert batch.to_pydict() == columns  # the values above are exact in float32


def test_schema_carries_its_version_and_readers_check_it():
    batch = build_rollout_batch(columns_of([ROW_A]))
    assert batch.schema.metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode()
    check_schema(batch)
    other = batch.replace_schema_metadata({VERSION_KEY: str(SCHEMA_VERSION + 1).encode()})
    with pytest.raises(ValueError, match="schema version"):
        check_schema(other)
    with pytest.raises(ValueError, match="schema version"):
        check_schema(batch.replace_schema_metadata(None))
    with pytest.raises(ValueError, match="schema version"):
        rows_of([other])


def test_schema_version_survives_ipc():
    """What Ray does to a batch (pickle protocol 5 over Arrow buffers) keeps the metadata."""
    batch = build_rollout_batch(columns_of([ROW_A, ROW_B]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    read = pa.ipc.open_stream(sink.getvalue()).read_next_batch()
    check_schema(read)
    assert read.equals(batch)


def values_buffer_address(batch: pa.RecordBatch, name: str) -> int:
    """Address of the first value of list column `name` in its Arrow data buffer."""
    child = batch.column(name).values
    return child.buffers()[1].address + child.offset * child.type.bit_width // 8


def test_ragged_views_share_memory_with_the_arrow_buffers():
    batch = build_rollout_batch(columns_of([ROW_A, ROW_B, ROW_C]))
    for name in ("prompt_ids", "response_ids", "rollout_log_probs", "loss_mask"):
        column = ragged(batch, name)
        assert column.values.ctypes.data == values_buffer_address(batch, name), name
        assert [column.row(i).tolist() for i in range(3)] == batch.column(name).to_pylist()
        assert column.lengths().tolist() == [len(v) for v in batch.column(name).to_pylist()]


def test_ragged_reads_the_rows_of_a_sliced_batch():
    sliced = build_rollout_batch(columns_of([ROW_A, ROW_B, ROW_C])).slice(1, 2)
    column = ragged(sliced, "prompt_ids")
    assert [column.row(i).tolist() for i in range(2)] == [[5], [4, 4]]


def test_out_of_band_pickle_round_trip_is_zero_copy():
    """Ray serializes Arrow batches with pickle protocol 5, handing their buffers over out of
    band (into shared memory); reading them back must wrap those buffers, not copy them."""
    batch = build_rollout_batch(columns_of([ROW_A, ROW_B, ROW_C]))
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    shared = [bytearray(b.raw()) for b in buffers]  # stands in for the object store's memory
    read = pickle.loads(data, buffers=shared)
    check_schema(read)
    assert read.equals(batch)
    view = ragged(read, "response_ids")
    starts = [np.frombuffer(memory, dtype=np.uint8).ctypes.data for memory in shared]
    assert any(
        start <= view.values.ctypes.data < start + len(memory)
        for start, memory in zip(starts, shared, strict=True)
    )


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_object_store_round_trip_is_zero_copy(local_ray):
    """A trainer's `ray.get` maps the batch out of shared memory: two gets of one object see
    the same bytes at the same address, read-only, and `ragged` views them without a copy."""
    rng = np.random.default_rng(0)
    rows = [
        sample_row(
            rng.integers(0, 1000, 64).tolist(),
            rng.integers(0, 1000, 64).tolist(),
            [-0.5] * 64,
            [1] * 64,
            0.5,
            group=i // 8,
            index=i % 8,
        )
        for i in range(512)  # ~400 KB: well above Ray's inline-object limit (100 KB)
    ]
    batch = build_rollout_batch(columns_of(rows))
    ref = ray.put(batch)
    first, second = ray.get(ref), ray.get(ref)
    check_schema(first)
    assert first.equals(batch)
    address = values_buffer_address(first, "response_ids")
    assert address == values_buffer_address(second, "response_ids")
    assert address != values_buffer_address(batch, "response_ids")
    view = ragged(first, "response_ids")
    assert view.values.ctypes.data == address
    assert not view.values.flags.writeable
    assert view.row(5).tolist() == rows[5]["response_ids"]


# --- training.batch: padding and micro-batches ----------------------------------------------


def test_pad_micro_batch_aligns_response_tokens():
    """Position t scores token t + 1, so response token j of a P-token prompt is at P - 1 + j."""
    rows = rows_of([build_rollout_batch(columns_of([ROW_A, ROW_B]))])
    mb = pad_micro_batch(rows, [0, 1])
    # Row A: prompt 5 6 7 (P=3), response 8 9.  Row B: prompt 5 (P=1), response 3 4 2.
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 3, 4, 2, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert mb.targets.tolist() == [[6, 7, 8, 9], [3, 4, 2, 0]]
    assert mb.loss_mask.tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]
    assert mb.rollout_log_probs.tolist() == [[0, 0, -0.5, -0.25], [-1, -2, -3, 0]]
    assert mb.advantages.tolist() == [[1.0], [-0.5]]
    assert mb.loss_mask.dtype == mb.rollout_log_probs.dtype == torch.float32
    # The masked targets are exactly the response tokens that count in the loss.
    assert mb.targets[mb.loss_mask.bool()].tolist() == [8, 9, 3, 4]
    # ... and response_log_probs cuts a per-token tensor back into each row's response.
    cut = response_log_probs(mb.rollout_log_probs, rows, [0, 1])
    assert [c.tolist() for c in cut] == [[-0.5, -0.25], [-1, -2, -3]]


def test_pad_micro_batch_of_a_subset_in_another_order():
    rows = rows_of(
        [build_rollout_batch(columns_of([ROW_A])), build_rollout_batch(columns_of([ROW_B, ROW_C]))]
    )
    assert len(rows) == 3
    mb = pad_micro_batch(rows, [2, 0])
    assert mb.input_ids.tolist() == [[4, 4, 1, 0, 0], [5, 6, 7, 8, 9]]
    assert mb.loss_mask.tolist() == [[0, 1, 0, 0], [0, 0, 1, 1]]
    assert mb.advantages.tolist() == [[0.25], [1.0]]


# --- routed experts (routing replay) -----------------------------------------------------------


def with_routing(row: dict, shape: RoutingShape, seed: int) -> dict:
    """`row` with random routing for its prompt + response - 1 positions."""
    positions = len(row["prompt_ids"]) + len(row["response_ids"]) - 1
    size = (positions, shape.layers, shape.top_k)
    experts = np.random.default_rng(seed).integers(0, shape.num_experts, size)
    return row | {"routed_experts": experts.astype(shape.dtype)}


@pytest.mark.parametrize("num_experts, arrow_type", [(128, pa.uint8()), (384, pa.uint16())])
def test_routed_experts_travel_compactly_and_pad_into_micro_batches(num_experts, arrow_type):
    shape = RoutingShape(layers=3, top_k=2, num_experts=num_experts)
    routed_a, routed_b = with_routing(ROW_A, shape, 1), with_routing(ROW_B, shape, 2)
    batch = build_rollout_batch(columns_of([routed_a, routed_b]))
    assert batch.schema.field("routed_experts").type == pa.list_(arrow_type)
    # one id per position, layer and slot: 4 + 3 positions x 3 layers x top-2
    assert batch.column("routed_experts").values.nbytes == 42 * arrow_type.byte_width
    rows = rows_of([pickle.loads(pickle.dumps(batch))], shape)  # as Ray moves it
    mb = pad_micro_batch(rows, [0, 1])
    assert mb.routed_experts.shape == (2, 5, 3, 2)  # [B, T, layers, top_k]
    np.testing.assert_array_equal(mb.routed_experts[0, :4], routed_a["routed_experts"])
    np.testing.assert_array_equal(mb.routed_experts[1, :3], routed_b["routed_experts"])
    # the last token of each row and the padding were never fed: experts 0, 1
    assert mb.routed_experts[0, 4:].tolist() == [[[0, 1]] * 3]
    assert mb.routed_experts[1, 3:].tolist() == [[[0, 1]] * 3] * 2
    # routing replay off: the column is not read
    assert pad_micro_batch(rows_of([batch]), [0]).routed_experts is None


def test_routed_experts_of_another_model_or_none_are_refused():
    shape = RoutingShape(layers=3, top_k=2, num_experts=128)
    batch = build_rollout_batch(columns_of([with_routing(ROW_A, shape, 1)]))
    with pytest.raises(ValueError, match="holds 24 ids, expected 4 positions x 2 MoE layers"):
        rows_of([batch], RoutingShape(layers=2, top_k=2, num_experts=128))
    without = build_rollout_batch(columns_of([ROW_A]))
    assert without.column("routed_experts").null_count == 1
    with pytest.raises(ValueError, match="carries no routed_experts"):
        rows_of([without], shape)
    with pytest.raises(ValueError, match="some completions have routed experts and some none"):
        build_rollout_batch(columns_of([with_routing(ROW_A, shape, 1), ROW_B]))


def rows_of_lengths(lengths: list[int]) -> Rows:
    """Rows of the given total lengths (a 1-token prompt and the rest response)."""
    prompts = [np.ones(1, dtype=np.int32) for _ in lengths]
    responses = [np.ones(n - 1, dtype=np.int32) for n in lengths]
    masks = [np.ones(n - 1, dtype=np.int8) for n in lengths]
    log_probs = [np.zeros(n - 1, dtype=np.float32) for n in lengths]
    return Rows(prompts, responses, log_probs, masks, np.zeros(len(lengths), dtype=np.float32))


def test_split_by_token_budget_by_hand():
    # 3 x 4 = 12 fits; row 3 (10) alone; rows 4-5 pad to 2 x 2.
    rows = rows_of_lengths([4, 4, 4, 10, 2, 2])
    assert split_by_token_budget(rows, 12) == [[0, 1, 2], [3], [4, 5]]


def test_an_oversize_row_gets_its_own_micro_batch():
    rows = rows_of_lengths([3, 50, 3, 3])
    assert split_by_token_budget(rows, 10) == [[0], [1], [2, 3]]
    assert split_by_token_budget(rows_of_lengths([50]), 10) == [[0]]
    assert split_by_token_budget(rows_of_lengths([]), 10) == []


@pytest.mark.parametrize("budget", [8, 20, 64, 1000])
def test_split_by_token_budget_respects_the_budget_and_keeps_order(budget):
    lengths = [random.Random(budget).randint(2, 40) for _ in range(60)]
    groups = split_by_token_budget(rows_of_lengths(lengths), budget)
    assert [i for group in groups for i in group] == list(range(len(lengths)))
    for group in groups:
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= budget or len(group) == 1
