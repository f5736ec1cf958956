"""Evaluation: avg@k and pass@k from per-sample rewards, named sets, slime's eval flags, and
the eval section's checks. No Ray here: the loop's own check is in tests/test_loop.py."""

import json

import pytest

import driver
from config.errors import UserError
from config.schema import DataConfig, EvalConfig
from data.sources import eval_sets
from rl.evaluation import EvalCounts, set_metrics


def parse(*argv: str):
    config, _ = driver.parse_args(list(argv))
    return config


def test_avg_and_pass_at_k_from_known_rewards():
    # Three prompts, k = 4, prompt by prompt: 2 correct, 0 correct (one 0.5), 4 correct.
    rewards = [1.0, 0.0, 1.0, 0.0] + [0.0, 0.5, 0.0, 0.0] + [1.0] * 4
    lengths = list(range(1, 13))
    counts = EvalCounts.of(rewards, lengths, k=4, threshold=1.0)
    metrics = set_metrics("aime", 4, counts)
    assert metrics == {
        "eval/aime/reward_mean": pytest.approx(6.5 / 12),
        "eval/aime/avg@4": pytest.approx(6 / 12),
        "eval/aime/pass@4": pytest.approx(2 / 3),
        "eval/aime/response_length": pytest.approx(78 / 12),
    }


def test_one_greedy_sample_gives_avg_equal_to_pass():
    counts = EvalCounts.of([1.0, 0.0, 1.0, 1.0], [3, 3, 3, 3], k=1, threshold=1.0)
    metrics = set_metrics("held_out", 1, counts)
    assert metrics["eval/held_out/avg@1"] == metrics["eval/held_out/pass@1"] == 0.75


def test_engine_shares_add_up_to_the_whole_set():
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    whole = EvalCounts.of(rewards, [1] * 6, k=2, threshold=1.0)
    parts = [
        EvalCounts.of(rewards[:2], [1] * 2, 2, 1.0),
        EvalCounts.of(rewards[2:], [1] * 4, 2, 1.0),
    ]
    assert sum(parts, EvalCounts()) == whole
    assert (whole.prompts, whole.solved, whole.correct) == (3, 2, 3)


def test_rewards_not_in_whole_groups_are_refused():
    with pytest.raises(ValueError, match="k=4"):
        EvalCounts.of([1.0] * 6, [1] * 6, k=4, threshold=1.0)


def test_slime_eval_flags_set_the_eval_keys(tmp_path):
    config = parse(
        *("--eval-prompt-data", "aime", "/data/aime.jsonl", "math", "/data/math500.jsonl"),
        *("--n-samples-per-eval-prompt", "16", "--eval-max-response-len", "16384"),
        *("--eval-top-p", "0.7", "--eval-temperature", "0.6", "--eval-interval", "20"),
    )
    e = config.eval
    assert e.prompt_data == {"aime": "/data/aime.jsonl", "math": "/data/math500.jsonl"}
    assert (e.samples_per_prompt, e.max_new_tokens, e.top_p, e.temperature) == (16, 16384, 0.7, 0.6)
    assert config.logging.eval_every == 20
    assert not e.greedy()


def test_slime_eval_array_without_temperature_samples_at_the_rollout_temperature():
    """slime's Qwen3-30B-A3B EVAL_ARGS give no --eval-temperature: k samples then use the
    rollout's temperature, as slime's do; one sample per prompt stays greedy."""
    config = parse("--n-samples-per-eval-prompt", "16", "--eval-top-p", "1")
    assert config.eval.temperature is None and not config.eval.greedy()
    assert parse().eval.greedy() and parse().eval.samples_per_prompt == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eval-prompt-data", "aime"], "takes NAME PATH pairs"),
        (["--eval-prompt-data", "a", "x.jsonl", "a", "y.jsonl"], "names a set twice"),
        (["--n-samples-per-eval-prompt", "0"], "eval.samples_per_prompt=0 must be >= 1"),
        (["--eval-top-p", "0"], "eval.top_p=0.0 must be in"),
        (["--eval-temperature", "-1"], "eval.temperature=-1.0 must be >= 0"),
        (["--eval-max-response-len", "0"], "eval.max_new_tokens=0 must be >= 1"),
        (
            ["--n-samples-per-eval-prompt", "4", "--eval-temperature", "0"],
            "4 identical greedy answers",
        ),
        (["--eval-prompt-data", "a/b", "x.jsonl"], "a name without '/'"),
        (
            ["--eval.overlap_training", "true", "--placement.colocate", "true"],
            "eval.overlap_training runs evaluations while the trainers step",
        ),
    ],
)
def test_bad_eval_settings_are_refused_by_name(capsys, argv, message):
    assert driver.main(argv) == 2
    assert message in capsys.readouterr().err


def test_named_sets_replace_the_default_set_and_are_cut_to_num_eval_prompts(tmp_path):
    for name, count in (("a", 5), ("b", 2)):
        rows = [{"prompt": f"{name} {i}", "label": str(i)} for i in range(count)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(num_eval_prompts=3)
    paths = {"a": str(tmp_path / "a.jsonl"), "b": str(tmp_path / "b.jsonl")}
    sets = eval_sets(data, EvalConfig(prompt_data=paths), held_out=["default"])
    assert {name: [p.label for p in prompts] for name, prompts in sets.items()} == {
        "a": ["0", "1", "2"],
        "b": ["0", "1"],
    }
    assert eval_sets(data, EvalConfig(), held_out=["default"]) == {"held_out": ["default"]}
    assert eval_sets(data, EvalConfig(), held_out=[]) == {}


def test_eval_check_names_the_field():
    with pytest.raises(UserError, match=r"eval\.top_p"):
        EvalConfig(top_p=1.5).check(DataConfig())


def test_named_sets_over_a_recipes_eval_data_are_told_in_the_dry_run(capsys, tmp_path):
    """slime's --eval-prompt-data over a recipe that sets data.eval_data: the recipe's file
    is not evaluated, and the plan says so."""
    held_out = tmp_path / "aime.jsonl"
    held_out.write_text(json.dumps({"prompt": "1 2", "label": "3"}) + "\n")
    argv = ["--dry-run", "--data.eval_data", str(held_out)]
    assert driver.main([*argv, "--eval-prompt-data", "aime", str(held_out)]) == 0
    assert f"data.eval_data={held_out} is not evaluated" in capsys.readouterr().out
    # Neither read nor needed: a recipe's file that is not on this machine is no error.
    gone = ["--dry-run", "--data.eval_data", str(tmp_path / "not_here.jsonl")]
    assert driver.main([*gone, "--eval-prompt-data", "aime", str(held_out)]) == 0
    assert "not_here.jsonl is not evaluated" in capsys.readouterr().out
    assert driver.main(argv) == 0
    assert "is not evaluated" not in capsys.readouterr().out


def test_every_node_must_see_the_named_sets_not_the_replaced_eval_data():
    from placement.multinode import read_paths

    config = parse("--data.eval_data", "/data/aime.jsonl", "--eval-prompt-data", "m", "/d/m.jsonl")
    keys = {p.key: p.path for p in read_paths(config)}
    assert keys.get("eval.prompt_data.m") == "/d/m.jsonl" and "data.eval_data" not in keys
