"""The rollout batch: the one Arrow schema that crosses from engines to trainers.

One row per sample. RolloutActors build record batches of whole prompt groups, put them into the
Ray object store and hand back only `RolloutBatchRef`s; trainers `ray.get` them, which maps the
Arrow buffers straight out of shared memory (no copy, no unpickling of rows).

Version 3 columns:

| column | type | meaning |
| --- | --- | --- |
| prompt_ids | list<int32> | prompt token ids (chat template applied) |
| response_ids | list<int32> | sampled token ids, EOS included when the engine stopped on it |
| rollout_log_probs | list<float32> | engine log-prob of each response token (tempered) |
| loss_mask | list<int8> | 1 where a response token counts in the loss (0: observation tokens) |
| turn_starts | list<int32> | where each model turn begins in response_ids (`[0]`: one turn) |
| reward | float32 | scalar reward of the sample |
| advantage | float32 | group-normalized advantage, the same for every token |
| group_id | int64 | prompt group (unique within a step) |
| sample_index | int32 | index of the sample inside its group |
| weight_version | int64 | weight version of the engine that generated it |
| finish_reason | string | `stop` (EOS) or `length` (max_new_tokens reached) |
| routed_experts | list<uint8> (list<uint16> past 256 experts) | routing replay: see below |

In a multi-turn episode (`rollout.environment`, docs/agents.md) `response_ids` is everything
after the prompt up to the model's last token: model turns and observations in the order the
engine read them, never re-tokenized; `weight_version` is the oldest of its turns'.

`routed_experts` is null unless routing replay is on; then it holds the engine's expert ids of
every input position, MoE layer and top-k slot, flattened from [prompt + response - 1, layers,
top_k] (`models.routing`); in a multi-turn episode each model token's experts are those of the
turn that sampled it.

Bump `SCHEMA_VERSION` on any change; readers reject batches of another version.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

SCHEMA_VERSION = 3
VERSION_KEY = b"sluice.rollout_schema_version"

ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("rollout_log_probs", pa.list_(pa.float32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.int8()), nullable=False),
        pa.field("turn_starts", pa.list_(pa.int32()), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("advantage", pa.float32(), nullable=False),
        pa.field("group_id", pa.int64(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("weight_version", pa.int64(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("routed_experts", pa.list_(pa.uint8())),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


@dataclass(frozen=True)
class RolloutBatchRef:
    """A record batch in the object store and the counts the driver balances with."""

    ref: ray.ObjectRef
    num_samples: int
    num_tokens: int
    """Prompt plus response tokens: what a trainer's forward pass costs."""
    num_loss_tokens: int
    """Response tokens with loss_mask 1: the token_mean normalizer sums these."""


def build_rollout_batch(columns: dict[str, list]) -> pa.RecordBatch:
    """A record batch of `ROLLOUT_SCHEMA` from per-row Python values, one list per column.

    `routed_experts`, if given, is one integer numpy array per row (any shape: it is stored
    flattened), all of one dtype, uint8 or uint16; absent or all None, the column is null.
    `turn_starts` absent: every row is one model turn (`[0]`)."""
    routed = columns.get("routed_experts")
    if "turn_starts" not in columns:
        columns = {**columns, "turn_starts": [[0]] * len(columns["prompt_ids"])}
    schema, arrays = ROLLOUT_SCHEMA, []
    for field in ROLLOUT_SCHEMA:
        if field.name != "routed_experts":
            arrays.append(pa.array(columns[field.name], type=field.type))
        elif routed is None or all(row is None for row in routed):
            arrays.append(pa.nulls(len(columns["prompt_ids"]), type=field.type))
        else:
            array = _flat_lists(routed)
            schema = schema.set(schema.get_field_index(field.name), field.with_type(array.type))
            arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _flat_lists(rows: list[np.ndarray]) -> pa.ListArray:
    """One list per row from numpy arrays, built from one concatenated buffer (no per-element
    Python objects: a step's routing is hundreds of bytes per token)."""
    if any(row is None for row in rows):
        raise ValueError(
            "routed_experts: some completions have routed experts and some none (routing "
            "replay needs every engine to record them)"
        )
    dtypes = {row.dtype for row in rows}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.uint8, np.uint16):
        raise ValueError(f"routed_experts rows must share one dtype, uint8 or uint16: {dtypes}")
    lengths = np.array([row.size for row in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([row.reshape(-1) for row in rows])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def check_schema(batch: pa.RecordBatch) -> None:
    """Reject batches written under another schema version (or none)."""
    version = (batch.schema.metadata or {}).get(VERSION_KEY)
    if version != str(SCHEMA_VERSION).encode():
        raise ValueError(
            f"rollout batch has schema version {version!r}, this trainer reads "
            f"{SCHEMA_VERSION}; engines and trainers must run the same Sluice version"
        )


@dataclass
class RaggedColumn:
    """A list<...> column as flat values + offsets, both viewing the Arrow buffers."""

    values: np.ndarray
    offsets: np.ndarray

    def row(self, index: int) -> np.ndarray:
        return self.values[self.offsets[index] : self.offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def ragged(batch: pa.RecordBatch, name: str) -> RaggedColumn:
    """Zero-copy numpy views of a list column (no per-row Python objects are made).

    `values` is the column's whole child array and `offsets` index into it, which stays right
    for a sliced batch (whose offsets do not start at 0).
    """
    column = batch.column(name)
    values = column.values.to_numpy(zero_copy_only=True)
    offsets = column.offsets.to_numpy(zero_copy_only=True)
    return RaggedColumn(values=values, offsets=offsets)


def scalar(batch: pa.RecordBatch, name: str) -> torch.Tensor:
    """A numeric column as a tensor (a copy: scalars are tiny next to the token lists)."""
    return torch.from_numpy(batch.column(name).to_numpy(zero_copy_only=False).copy())
