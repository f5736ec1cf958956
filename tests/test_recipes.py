"""Every recipe loads, validates and dry-runs; the built-in task and tiny model behave as their
docstrings say (disjoint splits, the reward's three cases, seeded bit-identical weights)."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from config import load_config
from config.loader import to_dict
from data.prompts import encode_prompt
from driver import dry_run
from models.tiny import VOCAB, build_tiny_model, build_tokenizer
from placement.cluster import synthetic_cluster
from placement.multinode import read_paths
from placement.planner import plan_layout
from tasks.digits import HELD_OUT, NUM_DIGITS, make_prompts, reward

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# Recipes that read nothing from disk. The cluster recipes read a shared file system's model
# and data: tests/test_cluster_recipes.py dry-runs every recipe over a fake one.
SELF_CONTAINED = [recipe for recipe in RECIPES if not read_paths(load_config(recipe))]


def test_there_are_recipes():
    assert REPO / "recipes" / "tiny.yaml" in SELF_CONTAINED


def gpus_needed(config) -> int:
    engines = config.rollout.num_engines * config.rollout.gpus_per_engine
    return config.train.num_workers + (0 if config.placement.colocate else engines)


@pytest.mark.parametrize("recipe", SELF_CONTAINED, ids=lambda path: path.name)
def test_recipe_loads_validates_and_dry_runs(recipe, capsys):
    config = load_config(recipe)  # unknown keys, wrong types and cross-field rules all raise
    assert config.validate() is config
    nodes = max(1, math.ceil(gpus_needed(config) / 8))
    dry_run(config, f"{nodes}x8")  # backend/engine checks, then a plan on nodes of 8 GPUs
    out = capsys.readouterr().out
    config_text, _, plan = out.partition("\n\nplacement: ")
    assert yaml.safe_load(config_text) == to_dict(config)
    assert plan.startswith(f"{gpus_needed(config)} GPUs on {nodes} node(s)")


@pytest.mark.parametrize(
    "recipe", [r for r in RECIPES if r not in SELF_CONTAINED], ids=lambda path: path.name
)
def test_cluster_recipes_dry_run_before_the_model_is_copied(recipe, capsys):
    """The dry run is for planning: a model directory absent here (as on a laptop before the
    cluster's shared file system is mounted) defers the model's checks to start-up."""
    import driver

    config = load_config(recipe)
    assert not Path(config.model.hf_checkpoint, "config.json").exists()
    nodes = max(1, math.ceil(gpus_needed(config) / 8))
    assert driver.main(["--config", str(recipe), "--dry-run", "--cluster", f"{nodes}x8"]) == 0
    out = capsys.readouterr().out
    assert "config.json is not readable here" in out
    if config.train.backend == "megatron":
        assert "layout was checked against the world size only" in out


def test_the_tiny_recipe_fits_a_two_core_cpu_machine():
    """It says it runs on a 2-core machine with no GPU: every actor must get a CPU bundle."""
    config = load_config(REPO / "recipes" / "tiny.yaml")
    layout = plan_layout(synthetic_cluster(1, 0, 2.0), config)
    assert not layout.use_gpus
    assert len(layout.train_slots) == config.train.num_workers
    assert len(layout.engine_slots) == config.rollout.num_engines
    assert layout.num_bundles * layout.cpus_per_bundle <= 2.0


# --- the built-in digits task ---------------------------------------------------------------


def test_digit_prompts_split_into_disjoint_train_and_held_out_sets():
    train, held_out = make_prompts(1234)
    assert len(held_out) == HELD_OUT
    assert len(train) > 10 * HELD_OUT
    train_texts = {p.text for p in train}
    held_out_texts = {p.text for p in held_out}
    assert len(train_texts) == len(train) and len(held_out_texts) == len(held_out)
    assert not train_texts & held_out_texts


def test_digit_prompts_are_well_formed_and_seeded():
    train, held_out = make_prompts(7)
    for record in train[:50] + held_out[:50]:
        words = record.text.split()
        assert len(words) == NUM_DIGITS + 1 and words[-1] == "="
        assert all(w.isdigit() and len(w) == 1 for w in words[:-1])
        assert record.label == words[0]
    assert make_prompts(7) == (train, held_out)
    assert make_prompts(8)[1] != held_out


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("7", 1.0),  # exactly the label
        (" 7 ", 1.0),
        ("7 2", 0.5),  # starts with the label, but does not stop
        ("7 7 7", 0.5),
        ("2", 0.0),  # wrong
        ("2 7", 0.0),
        ("", 0.0),
        ("72", 0.0),  # one word that is not the label
    ],
)
def test_digit_reward(response, expected):
    assert reward(prompt="7 2 9 4 =", response=response, label="7") == expected


# --- the tiny model and its tokenizer -------------------------------------------------------


def test_tiny_model_is_bit_identical_for_a_seed_and_differs_for_another():
    rng_before = torch.random.get_rng_state()
    first = build_tiny_model(0).state_dict()
    second = build_tiny_model(0).state_dict()
    other = build_tiny_model(1).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is untouched
    assert first.keys() == second.keys() == other.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    randomly_initialized = [n for n in first if first[n].std() > 0]
    assert randomly_initialized
    assert all(not torch.equal(first[n], other[n]) for n in randomly_initialized)


def test_tiny_model_dtype():
    model = build_tiny_model(0, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tokenizer_round_trips_a_prompt():
    tokenizer = build_tokenizer()
    prompt = make_prompts(0)[0][0].text
    ids = encode_prompt(tokenizer, prompt, apply_chat_template=True)  # one user turn: its text
    assert len(ids) == NUM_DIGITS + 1  # one token per word, no special tokens added
    assert tokenizer.pad_token_id not in ids  # no word fell back to the unknown token
    assert tokenizer.decode(ids) == prompt
    assert [VOCAB[i] for i in ids] == prompt.split()
    assert tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True) == prompt


def test_a_model_without_a_recipe_is_told_the_tiny_recipes_settings_apply(tmp_path, capsys):
    """`--model.hf_checkpoint` alone keeps recipes/tiny.yaml's 2 new tokens and digits reward:
    the driver says so and names the recipe for a real model; the built-in model is not told."""
    import driver
    from models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model", 1234)
    out = ["--logging.output_dir", str(tmp_path / "out")]
    assert driver.main(["--model.hf_checkpoint", str(model), "--dry-run", *out]) == 0
    notice = capsys.readouterr().err
    assert f"model.hf_checkpoint={model} runs with the built-in tiny recipe's settings" in notice
    assert "rollout.max_new_tokens 2" in notice and "--config recipes/your-model.yaml" in notice
    assert driver.main(["--dry-run", *out]) == 0
    assert "tiny recipe" not in capsys.readouterr().err
    assert (REPO / "recipes" / "your-model.yaml").is_file()
