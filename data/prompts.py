"""Prompt data: loading a user's .jsonl or .parquet file, encoding prompts for the model, and
serving them in a seeded, resumable order.

A prompt is plain text or a list of chat messages in the OpenAI format
(`[{"role": "system", "content": ...}, {"role": "user", "content": ...}]`, as dapo-math-17k
stores it); message lists are rendered by the model's own chat template
(`data.apply_chat_template`).

Every problem with a user's file is a `UserError` of one line that names the file (and the
line or row) and says what to change.
"""

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from config.errors import UserError

SUPPORTED_EXTENSIONS = (".jsonl", ".parquet")
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of the data set."""

    text: str
    """The prompt text, before any chat template; for a message-list prompt, the content of its
    last user message (what reward functions get as `prompt`, and logs show)."""

    label: str
    """The reference answer handed to the reward function; "" when the row has none."""

    source: str
    """Where it came from, for error messages and samples in logs: `train.jsonl:12` (line,
    from 1) or `train.parquet[11]` (row index, from 0)."""

    messages: tuple[dict[str, str], ...] = ()
    """The prompt as chat messages ({"role", "content"}), in order; () for a plain-text prompt."""

    @property
    def prompt(self) -> str | list[dict[str, str]]:
        """What the model is prompted with: the messages, or the text of a plain prompt."""
        return [dict(m) for m in self.messages] if self.messages else self.text

    def contents(self) -> list[str]:
        """Every text the model reads from this prompt: each message's content, or the text."""
        return [m["content"] for m in self.messages] if self.messages else [self.text]


def load_prompts(path: str, input_key: str, label_key: str) -> list[PromptRecord]:
    """Read every prompt of a .jsonl file (one JSON object a line; blank lines are skipped) or
    a .parquet file, taking the text from `input_key` and the label from `label_key`.

    Labels: a row without the label key (or with null) gets label "", so a data set may mix
    labelled and unlabelled rows; but a label key that NO row has is taken for a typo and is an
    error. Pass `label_key=""` for data without labels (every label is then ""). Non-string
    labels (numbers, lists) become their JSON text: 72 -> "72", 0.5 -> "0.5".
    Raises UserError for a missing or unreadable file, another extension, a line that is not a
    JSON object, a row without a string prompt, a missing column, or no prompts at all.
    """
    _check_readable(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        records = _load_jsonl(path, input_key, label_key)
    elif suffix == ".parquet":
        records = _load_parquet(path, input_key, label_key)
    else:
        raise UserError(
            f"prompt file {path} has unsupported extension {suffix or '(none)'!r}; use .jsonl "
            f"(one JSON object per line) or .parquet"
        )
    if not records:
        raise UserError(
            f"prompt file {path} holds no prompts; point the data config at a "
            f"file with at least one row"
        )
    return records


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(
            f"prompt file {path} does not exist; check data.prompt_data / "
            f"data.eval_data (relative paths start at the job's working directory)"
        )
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path} is not a file; name a .jsonl or .parquet file")
    if not os.access(path, os.R_OK):
        raise UserError(
            f"prompt file {path} cannot be read (permission denied); fix its permissions"
        )


def _load_jsonl(path: str, input_key: str, label_key: str) -> list[PromptRecord]:
    name = Path(path).name
    records, labelled, first_keys = [], False, None
    try:
        with open(path, "rb") as file:
            for line_number, raw in enumerate(file, start=1):
                where = f"{path}:{line_number}"
                row = _json_object(raw, where)
                if row is None:
                    continue
                first_keys = first_keys or list(row)
                if input_key not in row:
                    raise UserError(
                        f"{where}: no key {input_key!r} (keys: {_names(row)}); set "
                        f"data.input_key to the key that holds the prompt text"
                    )
                label = row.get(label_key) if label_key else None
                labelled = labelled or label_key in row
                source = f"{name}:{line_number}"
                records.append(_record(row[input_key], label, where, source, input_key))
    except OSError as error:
        raise UserError(f"prompt file {path} cannot be read ({error.strerror or error})") from None
    _check_labelled(path, label_key, labelled or not records, first_keys or [], "key")
    return records


def _json_object(raw: bytes, where: str) -> dict | None:
    """The JSON object on one line; None for a blank line."""
    try:
        line = raw.decode("utf-8-sig")  # -sig: a leading byte-order mark is dropped
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line of a "
            f".jsonl file must be one JSON object"
        ) from None
    if not isinstance(row, dict):
        raise UserError(
            f"{where}: a JSON {type(row).__name__} where a JSON object was expected; each line "
            f'of a .jsonl file must be one object such as {{"prompt": ..., "label": ...}}'
        )
    return row


def _load_parquet(path: str, input_key: str, label_key: str) -> list[PromptRecord]:
    try:
        columns = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as error:
        raise _unreadable_parquet(path, error) from None
    if input_key not in columns:
        raise UserError(
            f"prompt file {path} has no column {input_key!r} (columns: {_names(columns)}); set "
            f"data.input_key to the column that holds the prompt text"
        )
    has_labels = bool(label_key) and label_key in columns
    try:
        table = pq.read_table(path, columns=[input_key, label_key] if has_labels else [input_key])
    except (pa.ArrowException, OSError) as error:
        raise _unreadable_parquet(path, error) from None
    texts = table.column(input_key).to_pylist()
    labels = table.column(label_key).to_pylist() if has_labels else [None] * len(texts)
    name = Path(path).name
    records = [
        _record(text, label, f"{path}, row {index}", f"{name}[{index}]", input_key)
        for index, (text, label) in enumerate(zip(texts, labels, strict=True))
    ]
    _check_labelled(path, label_key, has_labels or not records, columns, "column")
    return records


def _record(prompt: Any, label: Any, where: str, source: str, input_key: str) -> PromptRecord:
    if isinstance(prompt, str):
        return PromptRecord(text=prompt, label=_label_text(label), source=source)
    if isinstance(prompt, list | tuple):
        messages = _messages(prompt, where, input_key)
        last_user = [m["content"] for m in messages if m["role"] == "user"][-1]
        return PromptRecord(last_user, _label_text(label), source, messages)
    kind = "null" if prompt is None else type(prompt).__name__
    raise UserError(
        f"{where}: {input_key!r} is {kind}; a prompt must be a string or a list of chat "
        f'messages [{{"role": "user", "content": "..."}}] (fix the row, or set data.input_key '
        f"to the prompt column)"
    )


def _messages(prompt: list | tuple, where: str, input_key: str) -> tuple[dict[str, str], ...]:
    """A message-list prompt checked: OpenAI chat messages with string content, at least one
    of them from the user (the turn the model answers)."""
    fix = (
        'each message must be {"role": "system"|"user"|"assistant", "content": "text"}; fix the row'
    )
    messages = []
    for index, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: {input_key}[{index}] is not a chat message; {fix}")
        if message.get("role") not in CHAT_ROLES:
            raise UserError(
                f"{where}: {input_key}[{index}] has role {message.get('role')!r}; {fix}"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "user" for m in messages):
        raise UserError(
            f"{where}: {input_key!r} has no user message; a chat prompt needs at least one "
            f'{{"role": "user", "content": ...}} for the model to answer'
        )
    return tuple(messages)


def _label_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return str(value)


def _check_labelled(path: str, label_key: str, found: bool, names: list, what: str) -> None:
    """A label key that no row has is most likely a typo: say so rather than train on ""."""
    if label_key and not found:
        raise UserError(
            f"prompt file {path} has no {what} {label_key!r} in any row ({what}s: "
            f"{_names(names)}); set data.label_key to the {what} that holds the reference "
            f'answer, or to "" for data without labels'
        )


def _unreadable_parquet(path: str, error: Exception) -> UserError:
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    return UserError(f"prompt file {path} is not a readable Parquet file ({reason})")


def _names(names: Any) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:20])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def encode_prompt(
    tokenizer: Any,
    prompt: str | Sequence[dict[str, str]],
    apply_chat_template: bool,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of a prompt (text or chat messages), ready for generation.

    With `apply_chat_template` and a tokenizer that has a chat template: the messages (a text
    prompt as one user message) are rendered with the generation prompt (the assistant turn's
    opening) and `template_kwargs`, then encoded WITHOUT the tokenizer's own special tokens,
    since templates write BOS themselves; encoding the rendered text with them would give two
    BOS tokens. Otherwise a text prompt is encoded as-is with the tokenizer's special tokens
    (BOS for Llama-style tokenizers, nothing for Qwen), dropping a duplicate BOS when the text
    already starts with one; a message list is refused, since any joining of its messages
    would be a template of our own that the model never saw.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not isinstance(prompt, str) and not (apply_chat_template and has_template):
        raise UserError(_untemplated_messages_message(apply_chat_template))
    if apply_chat_template and has_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        rendered = tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=True,
            **(template_kwargs or {}),
        )
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


def _untemplated_messages_message(apply_chat_template: bool) -> str:
    if not apply_chat_template:
        return (
            "data.apply_chat_template is false but the prompts are chat message lists; set "
            "data.apply_chat_template: true (--apply-chat-template) so the model's chat template "
            "renders them, or give plain-text prompts"
        )
    return (
        "the model's tokenizer has no chat template (tokenizer_config.json has no "
        "chat_template) but the prompts are chat message lists; use a model with a chat "
        "template, or give plain-text prompts"
    )


def model_has_chat_template(model_dir: str) -> bool:
    """Whether the Hugging Face model folder's tokenizer comes with a chat template: in
    tokenizer_config.json, or in the chat_template.jinja / chat_template.json files that newer
    transformers versions save it to."""
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def check_chat_settings(
    records: Sequence[PromptRecord], apply_chat_template: bool, template_kwargs: dict
) -> None:
    """Refuse settings that would be silently ignored or silently wrong: message-list prompts
    without the chat template, template arguments with the template off."""
    if not apply_chat_template and any(r.messages for r in records):
        raise UserError(_untemplated_messages_message(apply_chat_template=False))
    if template_kwargs and not apply_chat_template:
        raise UserError(
            f"data.chat_template_kwargs is set ({template_kwargs}) but data.apply_chat_template "
            f"is false, so no template would read it; set data.apply_chat_template: true or "
            f"drop data.chat_template_kwargs"
        )


class PromptStream:
    """An endless stream of prompt records, reshuffled every epoch, resumable.

    Epoch e visits every record exactly once, in the order of a permutation drawn from
    (seed, e) (file order when `shuffle` is False), so the position is just (epoch, index) and
    resuming from `state_dict()` replays the same sequence without storing any order.
    Not thread-safe: one owner (the driver) draws from it.
    """

    def __init__(self, records: Sequence[PromptRecord], seed: int, shuffle: bool = True):
        if not records:
            raise ValueError("PromptStream needs at least one record")
        self._records = records
        self._seed = seed
        self._shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._order = self._order_of(0)

    @property
    def epoch(self) -> int:
        """Epochs started so far, minus one (0 during the first pass over the data)."""
        return self._epoch

    def _order_of(self, epoch: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(len(self._records))
        rng = np.random.default_rng([self._seed % 2**64, epoch])
        return rng.permutation(len(self._records))

    def __iter__(self) -> Iterator[PromptRecord]:
        return self

    def __next__(self) -> PromptRecord:
        if self._position == len(self._records):
            self._epoch += 1
            self._position = 0
            self._order = self._order_of(self._epoch)
        record = self._records[int(self._order[self._position])]
        self._position += 1
        return record

    def next_groups(self, n: int) -> list[PromptRecord]:
        """The prompts of the next n groups (one record per group; the caller samples the
        group's responses). Crosses epoch boundaries as needed; n may exceed the data set."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, int | bool]:
        """The data position, plus what it is only valid for (data size, seed, shuffle)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "num_records": len(self._records),
            "seed": self._seed,
            "shuffle": self._shuffle,
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from a `state_dict()`. The data set size, seed and shuffle setting must be
        those of the run that saved it, or the position would point into a different order."""
        saved = (state["num_records"], state["seed"], state["shuffle"])
        current = (len(self._records), self._seed, self._shuffle)
        if saved != current:
            raise UserError(
                f"cannot resume the prompt order: the checkpoint was taken with "
                f"{saved[0]} prompts, seed {saved[1]}, shuffle={saved[2]}, this run has "
                f"{current[0]} prompts, seed {current[1]}, shuffle={current[2]}; resume with "
                f"the same data, seed and data.shuffle, or start a fresh run"
            )
        if not 0 <= state["position"] <= len(self._records) or state["epoch"] < 0:
            raise ValueError(f"invalid prompt stream state {state}")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._order = self._order_of(self._epoch)
