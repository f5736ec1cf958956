"""Prompt files (real JSONL and Parquet in tmp_path), prompt encoding and the prompt stream."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from config.errors import UserError
from data.prompts import PromptRecord, PromptStream, encode_prompt, load_prompts


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _user_error(path, *args) -> str:
    with pytest.raises(UserError) as error:
        load_prompts(path, *args)
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- JSONL


def test_jsonl_rows_become_records_with_line_sources(tmp_path):
    path = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            json.dumps({"question": "1+1?", "answer": "2"}),
            "",  # blank lines are skipped but still counted
            json.dumps({"question": "half of 1?", "answer": 0.5, "extra": [1]}),
            json.dumps({"question": "no label here"}),
            json.dumps({"question": "null label", "answer": None}),
        ],
    )
    records = load_prompts(path, "question", "answer")
    assert records == [
        PromptRecord("1+1?", "2", "train.jsonl:1"),
        PromptRecord("half of 1?", "0.5", "train.jsonl:3"),
        PromptRecord("no label here", "", "train.jsonl:4"),
        PromptRecord("null label", "", "train.jsonl:5"),
    ]


def test_a_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "hi", "label": "1"}).encode())
    assert load_prompts(str(path), "prompt", "label") == [PromptRecord("hi", "1", "bom.jsonl:1")]


def test_an_empty_label_key_means_data_without_labels(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "hi", "label": "x"})])
    assert load_prompts(path, "prompt", "") == [PromptRecord("hi", "", "p.jsonl:1")]


def test_a_label_key_no_row_has_is_a_typo(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "hi", "answer": "x"})])
    message = _user_error(path, "prompt", "label")
    assert path in message and "'label'" in message and "'answer'" in message
    assert "data.label_key" in message


def test_invalid_json_names_the_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"prompt": "a"}), "{'prompt': 1}"])
    message = _user_error(path, "prompt", "label")
    assert f"{path}:2" in message and "not valid JSON" in message


def test_a_line_that_is_not_an_object_is_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "list.jsonl", ['["a", "b"]'])
    assert f"{path}:1: a JSON list" in _user_error(path, "prompt", "label")


def test_a_row_without_the_input_key_lists_the_keys_it_has(tmp_path):
    rows = [json.dumps({"prompt": "a", "label": "1"}), json.dumps({"query": "b", "label": "2"})]
    path = _write_jsonl(tmp_path / "keys.jsonl", rows)
    message = _user_error(path, "prompt", "label")
    assert f"{path}:2" in message and "no key 'prompt'" in message
    assert "keys: 'query', 'label'" in message and "data.input_key" in message


def test_a_prompt_that_is_neither_text_nor_messages_is_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [json.dumps({"prompt": 7, "label": "1"})])
    message = _user_error(path, "prompt", "label")
    assert f"{path}:1" in message and "'prompt' is int" in message
    assert "a string or a list of chat messages" in message and "data.input_key" in message


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ([{"role": "tool", "content": "1"}], "prompt[0] has role 'tool'"),
        ([{"role": "user", "content": ["1"]}], "prompt[0] is not a chat message"),
        ([{"role": "user"}], "prompt[0] is not a chat message"),
        (["1 2"], "prompt[0] is not a chat message"),
        ([{"role": "system", "content": "be brief"}], "'prompt' has no user message"),
        ([], "'prompt' has no user message"),
    ],
)
def test_a_malformed_message_list_names_the_row_and_message(tmp_path, prompt, expected):
    path = _write_jsonl(tmp_path / "chat.jsonl", [json.dumps({"prompt": prompt, "label": "1"})])
    message = _user_error(path, "prompt", "label")
    assert f"{path}:1: {expected}" in message


def test_non_utf8_text_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok", "label": "1"}\n{"prompt": "caf\xe9"}\n')
    assert f"{path}:2: not UTF-8" in _user_error(str(path), "prompt", "label")


def test_an_empty_jsonl_file_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    assert f"{path} holds no prompts" in _user_error(path, "prompt", "label")


# ---------------------------------------------------------------- files and extensions


def test_a_missing_file_is_named(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    message = _user_error(path, "prompt", "label")
    assert f"{path} does not exist" in message and "data.prompt_data" in message


def test_a_directory_is_not_a_prompt_file(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    assert "is not a file" in _user_error(str(tmp_path / "dir.jsonl"), "prompt", "label")


@pytest.mark.parametrize("name", ["train.json", "train.csv", "train"])
def test_unsupported_extensions_list_the_supported_ones(tmp_path, name):
    (tmp_path / name).write_text('{"prompt": "a"}\n')
    message = _user_error(str(tmp_path / name), "prompt", "label")
    assert "unsupported extension" in message and ".jsonl" in message and ".parquet" in message


# ---------------------------------------------------------------- Parquet


def _write_parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_parquet_rows_become_records_with_row_sources(tmp_path):
    path = _write_parquet(
        tmp_path / "train.parquet",
        {"problem": ["1+1?", "2+2?"], "solution": [2, None], "other": [0.1, 0.2]},
    )
    assert load_prompts(path, "problem", "solution") == [
        PromptRecord("1+1?", "2", "train.parquet[0]"),
        PromptRecord("2+2?", "", "train.parquet[1]"),
    ]


def test_parquet_without_the_input_column_lists_the_columns(tmp_path):
    path = _write_parquet(tmp_path / "t.parquet", {"problem": ["a"], "label": ["1"]})
    message = _user_error(path, "prompt", "label")
    assert path in message and "no column 'prompt'" in message
    assert "columns: 'problem', 'label'" in message


def test_parquet_without_the_label_column_lists_the_columns(tmp_path):
    path = _write_parquet(tmp_path / "t.parquet", {"prompt": ["a"], "answer": ["1"]})
    message = _user_error(path, "prompt", "label")
    assert "no column 'label' in any row" in message and "'answer'" in message
    assert load_prompts(path, "prompt", "answer")[0].label == "1"


def test_parquet_null_prompt_names_the_row(tmp_path):
    path = _write_parquet(tmp_path / "t.parquet", {"prompt": ["a", None], "label": ["1", "2"]})
    assert f"{path}, row 1: 'prompt' is null" in _user_error(path, "prompt", "label")


def test_a_corrupt_parquet_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet at all")
    message = _user_error(str(tmp_path / "bad.parquet"), "prompt", "label")
    assert "not a readable Parquet file" in message


def test_an_empty_parquet_file_is_an_error(tmp_path):
    table = pa.table({"prompt": pa.array([], pa.string()), "label": pa.array([], pa.string())})
    pq.write_table(table, tmp_path / "empty.parquet")
    assert "holds no prompts" in _user_error(str(tmp_path / "empty.parquet"), "prompt", "label")


# ---------------------------------------------------------------- encoding

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "what", "is", "two", "?"]


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that, like Llama's, puts BOS before every encoded text."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<s>", "</s>", "<|user|>", "<|assistant|>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _ids(*words):
    return [VOCAB.index(w) for w in words]


def test_chat_template_is_applied_with_one_bos_and_the_generation_prompt():
    ids = encode_prompt(_tokenizer(CHAT_TEMPLATE), "what is two ?", apply_chat_template=True)
    assert ids == _ids("<s>", "<|user|>", "what", "is", "two", "?", "<|assistant|>")


def test_plain_encoding_when_not_requested_or_no_template():
    expected = _ids("<s>", "what", "is", "two", "?")
    assert encode_prompt(_tokenizer(CHAT_TEMPLATE), "what is two ?", False) == expected
    assert encode_prompt(_tokenizer(None), "what is two ?", True) == expected


def test_plain_encoding_does_not_double_a_bos_already_in_the_text():
    ids = encode_prompt(_tokenizer(None), "<s> what is two ?", apply_chat_template=False)
    assert ids == _ids("<s>", "what", "is", "two", "?")


# ---------------------------------------------------------------- stream


def _records(n):
    return [PromptRecord(f"p{i}", str(i), f"f.jsonl:{i + 1}") for i in range(n)]


def test_every_epoch_is_a_fresh_permutation_of_all_records():
    records = _records(20)
    stream = PromptStream(records, seed=7)
    first, second = stream.next_groups(20), stream.next_groups(20)
    assert sorted(first, key=records.index) == records == sorted(second, key=records.index)
    assert first != second and first != records
    assert stream.epoch == 1


def test_the_order_is_seeded():
    records = _records(20)
    assert PromptStream(records, 3).next_groups(30) == PromptStream(records, 3).next_groups(30)
    assert PromptStream(records, 3).next_groups(20) != PromptStream(records, 4).next_groups(20)


def test_groups_cross_epoch_boundaries_and_can_exceed_the_data():
    records = _records(5)
    stream = PromptStream(records, seed=0, shuffle=False)
    assert stream.next_groups(3) == records[:3]
    assert stream.next_groups(4) == records[3:] + records[:2]
    assert stream.next_groups(11) == records[2:] + records + records[:3]
    assert stream.epoch == 3


def test_resuming_from_a_state_dict_replays_the_same_order():
    records = _records(9)
    stream = PromptStream(records, seed=11)
    stream.next_groups(13)
    state = json.loads(json.dumps(stream.state_dict()))  # survives a checkpoint file
    expected = stream.next_groups(25)

    resumed = PromptStream(records, seed=11)
    resumed.load_state_dict(state)
    assert resumed.next_groups(25) == expected
    assert resumed.epoch == stream.epoch


def test_resuming_with_different_data_or_seed_is_refused():
    state = PromptStream(_records(9), seed=11).state_dict()
    for other in (PromptStream(_records(10), seed=11), PromptStream(_records(9), seed=12)):
        with pytest.raises(UserError, match="cannot resume the prompt order"):
            other.load_state_dict(state)


# ---------------------------------------------------------------- chat-format prompts

# A Qwen3-style (ChatML) template written for these tests: the `enable_thinking: false` kwarg
# opens the answer with an empty think block, as Qwen3's own template does.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant "
    "{% if enable_thinking is defined and not enable_thinking %}<think> </think> {% endif %}"
    "{% endif %}"
)
CHATML_WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHATML_WORDS += ["system", "user", "assistant", "solve", "x+1=35.", "think", "step", "by", "."]


def _chatml_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(CHATML_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _dapo_math_file(tmp_path) -> str:
    """Rows shaped like dapo-math-17k's: `prompt` a message list, `label` the answer."""
    rows = [
        {"prompt": [{"role": "user", "content": "solve x+1=35."}], "label": "34"},
        {
            "prompt": [
                {"role": "system", "content": "think step by step ."},
                {"role": "user", "content": "solve x+1=35."},
            ],
            "label": "34",
        },
    ]
    return _write_jsonl(tmp_path / "dapo-math-17k.jsonl", [json.dumps(r) for r in rows])


def _words(tokenizer, ids):
    return [tokenizer.convert_ids_to_tokens(i) for i in ids]


def test_a_dapo_math_shaped_file_is_read_templated_and_rewarded(tmp_path):
    from config.schema import DataConfig
    from data.sources import load_train_and_eval
    from rl.rewards import math_reward

    data = DataConfig(prompt_data=_dapo_math_file(tmp_path), eval_data=None)
    data.chat_template_kwargs = {"enable_thinking": False}
    train, _ = load_train_and_eval(data, seed=0)
    user_only, with_system = train
    assert user_only.messages == ({"role": "user", "content": "solve x+1=35."},)
    assert with_system.messages[0] == {"role": "system", "content": "think step by step ."}
    assert user_only.text == with_system.text == "solve x+1=35."  # the reward's `prompt`
    assert with_system.source == "dapo-math-17k.jsonl:2"

    tokenizer = _chatml_tokenizer()
    ids = encode_prompt(tokenizer, with_system.prompt, True, data.chat_template_kwargs)
    expected = "<|im_start|> system think step by step . <|im_end|> <|im_start|> user solve"
    expected += " x+1=35. <|im_end|> <|im_start|> assistant <think> </think>"
    assert _words(tokenizer, ids) == expected.split(" ")
    thinking = encode_prompt(tokenizer, user_only.prompt, True, {})  # no kwargs: no think block
    assert _words(tokenizer, thinking)[-2:] == ["<|im_start|>", "assistant"]
    assert "<unk>" not in _words(tokenizer, ids + thinking)

    for record in train:
        assert math_reward(prompt=record.text, response="x = \\boxed{34}", label=record.label) == 1
        assert math_reward(prompt=record.text, response="\\boxed{35}", label=record.label) == 0


def test_parquet_message_lists_are_read(tmp_path):
    chat = [[{"role": "system", "content": "s"}, {"role": "user", "content": "1 2 ="}]]
    path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.table({"prompt": chat, "label": ["1"]}), path)
    (record,) = load_prompts(path, "prompt", "label")
    assert record.messages == tuple(chat[0]) and record.text == "1 2 =" and record.label == "1"


def test_message_lists_without_the_chat_template_are_refused_naming_the_field(tmp_path):
    from config.schema import DataConfig
    from data.sources import load_train_and_eval

    data = DataConfig(prompt_data=_dapo_math_file(tmp_path), apply_chat_template=False)
    with pytest.raises(UserError) as error:
        load_train_and_eval(data, seed=0)
    assert "data.apply_chat_template is false" in str(error.value)
    assert "--apply-chat-template" in str(error.value)
    # Nor does encoding join the messages by itself, with the template off or missing.
    messages = [{"role": "user", "content": "what is two ?"}]
    with pytest.raises(UserError, match=r"data\.apply_chat_template"):
        encode_prompt(_tokenizer(CHAT_TEMPLATE), messages, apply_chat_template=False)
    with pytest.raises(UserError, match="tokenizer has no chat template"):
        encode_prompt(_tokenizer(None), messages, apply_chat_template=True)


def test_template_kwargs_with_the_template_off_are_refused():
    from config.schema import DataConfig
    from data.sources import load_train_and_eval

    data = DataConfig(apply_chat_template=False, chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(UserError, match=r"data\.chat_template_kwargs is set"):
        load_train_and_eval(data, seed=0)


def test_the_builtin_tokenizers_chat_template_renders_turns_as_the_model_reads_them():
    from models.tiny import build_tokenizer
    from tasks.digits import make_prompts

    tokenizer = build_tokenizer()
    conversation = [
        {"role": "system", "content": "1 ="},
        {"role": "user", "content": "7 2 9 4 ="},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "3 1 4 1 ="},
    ]
    rendered = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert rendered == "1 = <eos> 7 2 9 4 = 7 <eos> 3 1 4 1 ="
    ids = encode_prompt(tokenizer, conversation, apply_chat_template=True)
    assert tokenizer.decode(ids) == rendered and tokenizer.pad_token_id not in ids
    # A plain prompt, and the same text as one user message, encode exactly as before the
    # template existed, so the built-in task and its default job are unchanged.
    for record in make_prompts(0)[1][:20]:
        plain = list(tokenizer.encode(record.text))
        as_message = [{"role": "user", "content": record.text}]
        assert encode_prompt(tokenizer, record.text, apply_chat_template=True) == plain
        assert encode_prompt(tokenizer, as_message, apply_chat_template=True) == plain


def test_slimes_data_flags_set_the_data_keys():
    import driver

    config, _ = driver.parse_args(
        [
            *("--prompt-data", "/data/dapo-math-17k.jsonl", "--input-key", "question"),
            *("--label-key", "answer", "--apply-chat-template", "--rollout-shuffle", "false"),
            *("--apply-chat-template-kwargs", '{"enable_thinking":false}'),
        ]
    )
    data = config.data
    assert (data.prompt_data, data.input_key, data.label_key) == (
        "/data/dapo-math-17k.jsonl",
        "question",
        "answer",
    )
    assert data.apply_chat_template is True and data.shuffle is False
    assert data.chat_template_kwargs == {"enable_thinking": False}


def test_preflight_refuses_message_lists_for_a_model_without_a_chat_template(tmp_path):
    from actors.preflight import RunInputs, _check_chat_template
    from data.prompts import model_has_chat_template
    from models.tiny import build_tokenizer

    model = tmp_path / "model"
    build_tokenizer().save_pretrained(model)  # the tokenizer files of a model folder
    chat = [{"role": "user", "content": "1 2 3 4 ="}]
    inputs = RunInputs(train=[PromptRecord("1 2 3 4 =", "1", "chat.jsonl:1", tuple(chat))])
    assert model_has_chat_template(str(model))
    _check_chat_template(str(model), inputs)
    for name in ("chat_template.jinja", "chat_template.json"):
        (model / name).unlink(missing_ok=True)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert not model_has_chat_template(str(model))
    _check_chat_template(str(model), RunInputs(train=[PromptRecord("1 2", "1", "t.jsonl:1")]))
    with pytest.raises(UserError) as error:
        _check_chat_template(str(model), inputs)
    assert "chat.jsonl:1: the prompt is a chat message list" in str(error.value)
    assert "has no chat template" in str(error.value)


def test_the_rollout_actor_encodes_message_lists_with_the_template_kwargs(tmp_path):
    """What a rollout actor generates from: its `_encode` on the run's config and tokenizer."""
    from types import SimpleNamespace

    from actors.rollout_actor import RolloutActor
    from config import load_config

    config = load_config(None, {"data.chat_template_kwargs": "{enable_thinking: false}"})
    chat = ({"role": "system", "content": "think step by step ."},)
    chat += ({"role": "user", "content": "solve x+1=35."},)
    records = [PromptRecord("solve x+1=35.", "34", "t.jsonl:1", chat)]
    actor = SimpleNamespace(config=config, tokenizer=_chatml_tokenizer())
    (ids,) = RolloutActor._encode(actor, records)
    assert _words(actor.tokenizer, ids)[-3:] == ["assistant", "<think>", "</think>"]
    assert _words(actor.tokenizer, ids)[:3] == ["<|im_start|>", "system", "think"]
