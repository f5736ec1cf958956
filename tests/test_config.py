"""Typed config: recipes, dotted overrides and their type conversion, the errors that name the
field, the cross-field checks of `validate()`, and the rule that every field is documented."""

import dataclasses
import functools
from pathlib import Path

import pytest
import yaml

from config import SluiceConfig, UserError, load_config
from config.loader import all_keys, describe_keys, field_docs, field_types, to_dict

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(recipe=None, overrides=None) -> str:
    """The message of the UserError that loading raises (always one line)."""
    with pytest.raises(UserError) as error:
        load_config(recipe, overrides)
    message = str(error.value)
    assert "\n" not in message
    return message


def get_dotted(config: SluiceConfig, key: str):
    return functools.reduce(getattr, key.split("."), config)


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in all_keys():  # a section
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- recipes --------------------------------------------------------------------------------


def test_no_recipe_gives_the_defaults():
    assert load_config() == SluiceConfig()


def test_the_tiny_recipe_sets_what_it_says():
    config = load_config(TINY)
    resolved = flatten(to_dict(config))
    for key, value in flatten(yaml.safe_load(TINY.read_text())).items():
        assert resolved[key] == value, key


def test_a_recipe_overrides_only_the_keys_it_names(tmp_path):
    recipe = write_recipe(
        tmp_path,
        "num_steps: 3\ntrain:\n  lr: 1e-4\n  parallel:\n    expert: 2\nrollout:\n  top_k: 5\n"
        "algorithm:\n  kl_type: k2\nlogging:\n  progress_bar: false\n",
    )
    config = load_config(recipe)
    expected = SluiceConfig()
    expected.num_steps = 3
    expected.train.lr = 1e-4  # YAML reads 1e-4 (no dot) as a string; the loader converts it
    expected.train.parallel.expert = 2
    expected.rollout.top_k = 5
    expected.algorithm.kl_type = "k2"
    expected.logging.progress_bar = False
    assert config == expected
    assert isinstance(config.train.lr, float)


def test_an_empty_recipe_or_section_means_defaults(tmp_path):
    assert load_config(write_recipe(tmp_path, "")) == SluiceConfig()
    assert load_config(write_recipe(tmp_path, "train:\n", "section.yaml")) == SluiceConfig()


def test_recipe_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in config_error(missing)
    bad_yaml = write_recipe(tmp_path, "train: [1,\n", "bad.yaml")
    assert "not valid YAML" in config_error(bad_yaml)
    a_list = write_recipe(tmp_path, "- 1\n- 2\n", "list.yaml")
    assert "must be a mapping" in config_error(a_list)
    assert "train must be a mapping" in config_error(write_recipe(tmp_path, "train: 3\n", "s.yaml"))


def test_a_recipe_that_is_not_utf8_is_a_user_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# réglages\nnum_steps: 3\n".encode("latin-1"))
    assert str(path) in config_error(path)


def test_unknown_recipe_key_names_the_file_and_the_nearest_key(tmp_path):
    recipe = write_recipe(tmp_path, "train:\n  lrr: 0.1\n")
    message = config_error(recipe)
    assert str(recipe) in message
    assert "'train.lrr'" in message
    assert "did you mean train.lr" in message


def test_a_field_in_the_wrong_section_finds_its_section(tmp_path):
    message = config_error(write_recipe(tmp_path, "rollout:\n  weight_decay: 0.1\n"))
    assert "'rollout.weight_decay'" in message
    assert "train.weight_decay" in message


def test_wrong_types_in_a_recipe_name_the_field(tmp_path):
    message = config_error(write_recipe(tmp_path, "train:\n  num_workers: two\n"))
    assert "train.num_workers='two' should be int" in message
    message = config_error(write_recipe(tmp_path, "train:\n  lr: [0.1]\n", "list.yaml"))
    assert "train.lr=[0.1] should be float" in message


# --- dotted overrides -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("train.lr", "1e-4", 1e-4),
        ("train.lr", "0.5", 0.5),
        ("train.lr", "1", 1.0),  # an int where a float is meant
        ("rollout.temperature", "2", 2.0),
        ("num_steps", "7", 7),
        ("rollout.top_k", "0", 0),
        ("logging.progress_bar", "false", False),
        ("data.shuffle", "true", True),
        ("algorithm.kl_type", "k3", "k3"),
        ("algorithm.loss_aggregation", "sequence_mean", "sequence_mean"),
        ("placement.use_gpus", "auto", "auto"),
        ("data.eval_data", "null", None),
        ("data.eval_data", "held_out.jsonl", "held_out.jsonl"),
        ("rollout.reward", "rl.rewards:math_reward", "rl.rewards:math_reward"),
        ("train.parallel.expert", "4", 4),
    ],
)
def test_overrides_convert_to_the_field_type(key, raw, expected):
    value = get_dotted(load_config(TINY, {key: raw}), key)
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_apply_on_top_of_the_recipe_in_order():
    config = load_config(TINY, {"train.num_workers": "4", "train.parallel.tensor": "2"})
    assert (config.train.num_workers, config.train.parallel.tensor) == (4, 2)
    assert config.train.lr == load_config(TINY).train.lr  # untouched keys keep the recipe's value


def test_typed_override_values_are_accepted_from_python():
    config = load_config(None, {"train.lr": 0.25, "num_steps": 2, "data.shuffle": False})
    assert (config.train.lr, config.num_steps, config.data.shuffle) == (0.25, 2, False)


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("train.lr", "abc", "train.lr='abc' should be float, not str"),
        ("num_steps", "1.5", "num_steps=1.5 should be int, not float"),
        ("num_steps", "true", "num_steps=True should be int, not bool"),
        ("logging.progress_bar", "maybe", "logging.progress_bar='maybe' should be bool"),
        ("data.shuffle", "1", "data.shuffle=1 should be bool, not int"),
        ("algorithm.kl_type", "k4", "algorithm.kl_type='k4' is not one of 'k1', 'k2', 'k3'"),
        ("rollout.batching", "dynamic", "is not one of 'static', 'continuous'"),
        ("model.dtype", "float16", "is not one of 'float32', 'bfloat16'"),
    ],
)
def test_override_errors_name_the_field_and_what_it_takes(key, raw, expected):
    message = config_error(None, {key: raw})
    assert message.startswith("command line: ")
    assert expected in message


def test_unknown_override_suggests_the_nearest_key():
    message = config_error(None, {"train.lrr": "1"})
    assert "unknown config key 'train.lrr'" in message
    assert "did you mean train.lr" in message
    message = config_error(None, {"num_step": "1"})
    assert "did you mean num_steps" in message


@pytest.mark.parametrize(
    "argv, meant",
    [
        (["--output-dir", "x"], "--logging.output_dir"),  # a leaf, dashes for underscores
        (["--num-steps", "3"], "--num_steps"),
        (["--rollout.max-new-tokens", "3"], "--rollout.max_new_tokens"),
        (["--use_tis"], "--use-tis"),  # slime's name with underscores
    ],
)
def test_unknown_flags_suggest_across_spellings(argv, meant):
    import driver

    with pytest.raises(UserError) as error:
        driver.parse_args(argv)
    assert f"did you mean {meant}?" in str(error.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        # a negative number is the flag's value, exponent or not (argparse took it for a flag)
        (["--train.lr", "-1e-3"], "train.lr=-0.001 must be > 0"),
        (["--train.weight_decay", "-.5"], "train.weight_decay=-0.5 must be >= 0"),
        (["--config", "recipes"], "recipe recipes is a directory; pass --config with a recipe"),
    ],
)
def test_command_line_mistakes_are_named_as_they_are(argv, message):
    import driver

    with pytest.raises(UserError, match=message):
        driver.parse_args(argv)
    config, _ = driver.parse_args(["--algorithm.clip_low", "0.1", "--train.adam_eps=1e-8"])
    assert config.algorithm.clip_low == 0.1 and config.train.adam_eps == 1e-8


def test_a_bare_field_name_finds_its_section():
    assert "train.grad_clip" in config_error(None, {"grad_clip": "1"})


def test_a_section_cannot_be_set_as_a_value():
    message = config_error(None, {"train.parallel": "2"})
    assert "train.parallel is a section" in message


@pytest.mark.parametrize(("key", "raw"), [("logging.output_dir", "100"), ("data.input_key", "yes")])
def test_a_string_field_takes_any_text(key, raw):
    assert get_dotted(load_config(None, {key: raw}), key) == raw


@pytest.mark.parametrize("choice", ["yes", "no"])
def test_use_gpus_yes_and_no_from_the_command_line(choice):
    assert load_config(None, {"placement.use_gpus": choice}).placement.use_gpus == choice


def test_use_gpus_no_in_a_recipe(tmp_path):
    recipe = write_recipe(tmp_path, "placement:\n  use_gpus: no\n")
    assert load_config(recipe).placement.use_gpus == "no"


# --- validate(): cross-field checks ---------------------------------------------------------


def test_batch_size_must_be_a_multiple_of_the_group_size():
    message = config_error(None, {"rollout.batch_size": "250", "rollout.samples_per_prompt": "8"})
    assert "rollout.batch_size=250 is not divisible by rollout.samples_per_prompt=8" in message
    assert "248" in message  # the nearest multiple is offered as the fix
    assert load_config(None, {"rollout.batch_size": "24", "rollout.samples_per_prompt": "3"})


def test_a_group_needs_at_least_two_samples():
    assert "samples_per_prompt must be >= 2" in config_error(
        None, {"rollout.samples_per_prompt": "1"}
    )


@pytest.mark.parametrize(
    ("workers", "tensor", "pipeline", "context"),
    [(4, 3, 1, 1), (6, 2, 2, 1), (8, 1, 1, 3), (2, 1, 4, 1)],
)
def test_world_size_must_divide_into_tensor_pipeline_context(workers, tensor, pipeline, context):
    message = config_error(
        None,
        {
            "train.num_workers": str(workers),
            "train.parallel.tensor": str(tensor),
            "train.parallel.pipeline": str(pipeline),
            "train.parallel.context": str(context),
        },
    )
    assert f"train.num_workers={workers} is not divisible by tensor x pipeline x context" in message
    assert f"{tensor} x {pipeline} x {context}" in message


def test_a_world_size_that_divides_is_accepted():
    config = load_config(
        None,
        {
            "train.num_workers": "8",
            "train.parallel.tensor": "2",
            "train.parallel.pipeline": "2",
            "train.parallel.context": "2",
        },
    )
    assert config.train.num_workers == 8


def test_each_data_parallel_rank_and_engine_needs_a_prompt_group():
    small = {"rollout.batch_size": "16", "rollout.samples_per_prompt": "8"}  # 2 groups
    message = config_error(None, {**small, "train.num_workers": "4"})
    assert "gives 2 prompt groups, fewer than the 4 data-parallel training ranks" in message
    message = config_error(None, {**small, "rollout.num_engines": "3"})
    assert "or the 3 engines" in message
    # Tensor parallelism shrinks the data-parallel size: 4 ranks at TP 2 are 2 DP ranks.
    assert load_config(None, {**small, "train.num_workers": "4", "train.parallel.tensor": "2"})


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("num_steps", "0", "num_steps=0 must be >= 1"),
        ("rollout.num_engines", "0", "rollout.num_engines=0 must be >= 1"),
        ("train.num_workers", "-1", "train.num_workers=-1 must be >= 1"),
        ("train.parallel.expert", "0", "train.parallel.expert=0 must be >= 1"),
        ("train.max_tokens_per_micro_batch", "0", "train.max_tokens_per_micro_batch=0"),
        ("rollout.temperature", "0", "rollout.temperature must be > 0"),
        ("rollout.top_p", "0", "rollout.top_p=0.0 must be in (0, 1]"),
        ("rollout.top_p", "1.5", "rollout.top_p=1.5 must be in (0, 1]"),
        ("algorithm.clip_low", "1", "algorithm.clip_low must be in [0, 1)"),
        ("algorithm.kl_coef", "-0.1", "algorithm.kl_coef must be >= 0"),
        ("weight_sync.bucket_size_mb", "0", "weight_sync.bucket_size_mb must be > 0"),
        ("placement.cpus_per_bundle", "0", "placement.cpus_per_bundle must be > 0"),
        ("logging.eval_every", "-1", "logging.eval_every must be >= 0"),
        ("timeouts.train_s", "0", "timeouts.train_s=0 must be > 0 (seconds)"),
        ("algorithm.max_staleness", "-1", "algorithm.max_staleness=-1 must be >= 0"),
    ],
)
def test_out_of_range_values_name_the_field(key, raw, expected):
    assert expected in config_error(None, {key: raw})


@pytest.mark.parametrize(
    ("key", "raw"), [("train.lr", "-1"), ("train.lr", "nan"), ("rollout.temperature", "nan")]
)
def test_negative_or_non_finite_floats_are_rejected(key, raw):
    assert key in config_error(None, {key: raw})


def test_rollouts_ahead_need_their_own_gpus_and_a_ratio_against_the_generating_weights():
    message = config_error(None, {"algorithm.max_staleness": "1", "placement.colocate": "true"})
    assert "colocated engines share the trainers' GPUs" in message
    assert "placement.colocate=false, or max_staleness 0" in message
    from training.loss import LossSettings

    stale = {"algorithm.max_staleness": "1", "algorithm.tis": "off"}
    recomputed = load_config(None, {**stale, "algorithm.old_log_probs": "recompute"})
    with pytest.raises(UserError, match="would take them as on-policy"):
        LossSettings.of(recomputed)
    assert LossSettings.of(load_config(None, stale)).old_log_probs == "rollout"  # auto
    with_tis = load_config(None, {**stale, "algorithm.tis": "on"})
    assert LossSettings.of(with_tis).tis  # recomputed ratio, TIS against the engine's


@pytest.mark.parametrize("partial", ["finish", "abort"])
def test_more_than_one_step_ahead_is_refused_since_the_engines_drain_at_each_update(partial):
    ahead = {"algorithm.max_staleness": "2", "rollout.partial": partial}
    message = config_error(None, ahead)
    assert message.startswith("algorithm.max_staleness=2 ")
    assert "drain before every weight update" in message
    assert "set algorithm.max_staleness=1" in message
    assert load_config(None, {**ahead, "algorithm.max_staleness": "1"}).algorithm.max_staleness


def clip_and_aggregation(config: SluiceConfig) -> tuple:
    a = config.algorithm
    return a.clip_low, a.clip_high, a.loss_aggregation


GSPO_VALUES = (3e-4, 4e-4, "sequence_mean")


def test_gspo_takes_its_own_clip_range_and_aggregation_where_the_user_set_none(tmp_path):
    import driver

    assert clip_and_aggregation(load_config(TINY)) == (0.2, 0.28, "token_mean")  # GRPO: PPO's
    assert clip_and_aggregation(load_config(TINY, {"algorithm.loss": "gspo"})) == GSPO_VALUES
    recipe = write_recipe(tmp_path, "algorithm:\n  loss: gspo\n")
    assert clip_and_aggregation(load_config(recipe)) == GSPO_VALUES
    # slime's spelling reaches the same key, so the same values.
    config, _ = driver.parse_args(["--advantage-estimator", "gspo"])
    assert clip_and_aggregation(config) == GSPO_VALUES


def test_a_value_the_user_set_wins_over_gspos_even_ppos_own(tmp_path):
    import driver

    # Set on the command line to PPO's default: the user asked for it, so it stays.
    flags = {"algorithm.loss": "gspo", "algorithm.clip_low": "0.2"}
    assert clip_and_aggregation(load_config(TINY, flags)) == (0.2, 4e-4, "sequence_mean")
    config, _ = driver.parse_args(
        ["--advantage-estimator", "gspo", "--algorithm.clip_high", "1e-3"]
    )
    assert clip_and_aggregation(config) == (3e-4, 1e-3, "sequence_mean")
    # Set in the recipe, the loss from the command line.
    recipe = write_recipe(tmp_path, "algorithm:\n  loss_aggregation: token_mean\n")
    config = load_config(recipe, {"algorithm.loss": "gspo"})
    assert clip_and_aggregation(config) == (3e-4, 4e-4, "token_mean")


def test_a_gspo_run_says_at_start_up_which_clip_and_aggregation_it_took(capsys):
    import driver
    from tracking.metrics import start_line

    config = load_config(TINY, {"algorithm.loss": "gspo", "algorithm.clip_high": "0.01"})
    first, second = start_line(config).splitlines()
    assert first.startswith("sluice: 80 steps of GSPO on")
    assert second == (
        "sluice: GSPO with clip_low 0.0003 (GSPO's), clip_high 0.01 (not GSPO's 0.0004), "
        "loss_aggregation sequence_mean (GSPO's)"
    )
    assert len(start_line(load_config(TINY)).splitlines()) == 1  # GRPO: no such line
    assert driver.main(["--dry-run", "--advantage-estimator", "gspo"]) == 0
    assert (
        "# GSPO with clip_low 0.0003 (GSPO's), clip_high 0.0004 (GSPO's)" in capsys.readouterr().out
    )


def test_validate_returns_the_config_itself():
    config = SluiceConfig()
    assert config.validate() is config


# --- every field documented (style rule: a docstring under every field) ---------------------


def config_classes(cls: type = SluiceConfig) -> list[type]:
    found = [cls]
    for hint in field_types(cls).values():
        if dataclasses.is_dataclass(hint):
            found += config_classes(hint)
    return found


def test_every_key_has_a_docstring_and_its_default():
    rows = describe_keys()
    assert [key for key, _, _ in rows] == all_keys()
    assert len(rows) == len(set(all_keys())) > 40
    defaults = flatten(to_dict(SluiceConfig()))
    for key, default, doc in rows:
        assert doc.strip(), f"{key} has no docstring"
        assert default == defaults[key], key
        assert "\n" not in doc  # folded to one line for --help


@pytest.mark.parametrize("cls", config_classes(), ids=lambda cls: cls.__name__)
def test_every_field_of_every_config_class_is_documented(cls):
    undocumented = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
    assert undocumented == []


def test_field_docs_folds_multi_line_docstrings_and_skips_properties():
    rollout = type(SluiceConfig().rollout)
    docs = field_docs(rollout)
    assert "prompts_per_step" not in docs  # a property, not a field
    assert set(docs) == {f.name for f in dataclasses.fields(rollout)}
    assert all("\n" not in doc and "  " not in doc for doc in docs.values())
