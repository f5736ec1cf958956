"""Reward functions: loading by path, checking what they return, and `math_reward`."""

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from config.errors import UserError
from rl import rewards
from rl.rewards import compute_reward, load_reward_fn, math_reward


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    """Write a module with the given source where `import` finds it; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"user_reward_{request.node.name.replace('[', '_').replace(']', '_')}"
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
        return name

    return write


# ---------------------------------------------------------------- loading


def test_load_reward_fn_imports_the_named_function():
    assert load_reward_fn("rl.rewards:math_reward") is math_reward


def test_load_reward_fn_from_a_user_module_and_a_dotted_attribute(user_module):
    name = user_module(
        "class Scorer:\n"
        "    @staticmethod\n"
        "    def exact(prompt, response, label):\n"
        "        return response == label\n"
    )
    fn = load_reward_fn(f"{name}:Scorer.exact")
    assert compute_reward(fn, "x", "p", "42", "42") == 1.0


@pytest.mark.parametrize("path", ["rl.rewards", "rl.rewards:", ":math_reward", "a:b:c", ""])
def test_malformed_paths_are_rejected_with_the_form_to_use(path):
    with pytest.raises(UserError, match="module:function") as error:
        load_reward_fn(path)
    assert repr(path) in str(error.value)


def test_a_missing_module_names_the_path_and_the_import_error():
    with pytest.raises(UserError) as error:
        load_reward_fn("no_such_reward_module:score")
    message = str(error.value)
    assert "no_such_reward_module:score" in message
    assert "ModuleNotFoundError: No module named 'no_such_reward_module'" in message


def test_a_module_whose_import_fails_reports_its_error_on_one_line(user_module):
    name = user_module("raise ImportError('needs the foo package\\n  pip install foo')\n")
    with pytest.raises(UserError) as error:
        load_reward_fn(f"{name}:score")
    message = str(error.value)
    assert f"{name}:score" in message
    assert "ImportError: needs the foo package" in message
    assert "\n" not in message


def test_a_missing_attribute_is_named(user_module):
    name = user_module("def score(prompt, response, label):\n    return 1.0\n")
    with pytest.raises(UserError, match="has no attribute 'scroe'"):
        load_reward_fn(f"{name}:scroe")


def test_a_non_callable_attribute_is_rejected(user_module):
    name = user_module("THRESHOLD = 3\n")
    with pytest.raises(UserError, match=r"THRESHOLD is a int, not a function"):
        load_reward_fn(f"{name}:THRESHOLD")


def test_a_function_that_cannot_take_the_keywords_is_rejected_at_load(user_module):
    name = user_module("def score(completion, answer):\n    return 1.0\n")
    with pytest.raises(UserError, match="must accept keyword arguments prompt, response"):
        load_reward_fn(f"{name}:score")
    name = user_module("def score(**fields):\n    return 1.0\n")
    assert callable(load_reward_fn(f"{name}:score"))


# ---------------------------------------------------------------- calling


def test_reward_function_is_called_by_keyword():
    def reward(label, response, prompt):  # parameters in another order
        return float(f"{prompt}{response}{label}")

    assert compute_reward(reward, "m:reward", "1", "2", "3") == 123.0


@pytest.mark.parametrize(
    "value, expected",
    [(True, 1.0), (False, 0.0), (2, 2.0), (0.25, 0.25), (np.float32(0.5), 0.5), (np.bool_(1), 1.0)],
)
def test_numbers_and_bools_become_floats(value, expected):
    reward = compute_reward(lambda **_: value, "m:f", "p", "r", "l")
    assert reward == expected and type(reward) is float


@pytest.mark.parametrize("value, type_name", [("1.0", "str"), (None, "NoneType"), ([1], "list")])
def test_a_non_number_names_the_path_the_type_and_the_fix(value, type_name):
    with pytest.raises(UserError) as error:
        compute_reward(lambda **_: value, "my_rewards:judge", "p", "r", "l")
    message = str(error.value)
    assert "my_rewards:judge" in message
    assert f"returned {type_name}" in message
    assert "return float(score)" in message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinite_rewards_are_errors(value):
    with pytest.raises(UserError, match=r"my_rewards:judge returned .*finite number"):
        compute_reward(lambda **_: value, "my_rewards:judge", "p", "r", "l")


def test_an_exception_inside_the_function_names_it_and_keeps_the_cause():
    def broken(prompt, response, label):
        return 1 / 0

    with pytest.raises(UserError) as error:
        compute_reward(broken, "m:broken", "1 2 =", "r", "l")
    message = str(error.value)
    assert message.startswith("reward function m:broken raised ZeroDivisionError: division by zero")
    assert "prompt '1 2 ='" in message
    assert isinstance(error.value.__cause__, ZeroDivisionError)  # its traceback goes to error.log


# ---------------------------------------------------------------- math_reward


@pytest.mark.parametrize(
    "response, label, expected",
    [
        ("Half of 1 is \\boxed{0.5}.", "1/2", 1.0),
        ("So the answer is 1/2", "0.5", 1.0),
        ("We get $\\frac{2}{4}$, i.e. \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("First I guessed 3. Then \\boxed{4}. Check: 4 - 1 = 3", "4", 1.0),  # boxed wins
        ("Expanding gives $3 + 2x$", "2x+3", 1.0),
        ("The final answer is 1,000", "1000", 1.0),
        ("The answer is \\boxed{5}", "6", 0.0),
        ("I do not know", "6", 0.0),
        ("\\boxed{6}", "", 0.0),
    ],
)
def test_math_reward_compares_final_answers_mathematically(response, label, expected):
    assert math_reward(prompt="q", response=response, label=label) == expected


def test_math_reward_loads_and_scores_through_the_public_path():
    fn = load_reward_fn("rl.rewards:math_reward")
    assert compute_reward(fn, "rl.rewards:math_reward", "q", "\\boxed{0.5}", "1/2") == 1.0


def test_math_reward_works_outside_the_main_thread():
    # math_verify's signal-based timeout raises ValueError in any thread but the main one
    cases = [("\\boxed{0.5}", "1/2", 1.0), ("so 7", "8", 0.0), ("$\\sqrt{4}$", "2", 1.0)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda c: math_reward("q", c[0], c[1]), cases))
    assert results == [expected for _, _, expected in cases]


def test_the_deadline_returns_the_fallback_without_waiting_for_a_slow_check():
    started = time.perf_counter()
    assert rewards._with_deadline(lambda: time.sleep(2) or 1.0, 0.05, 0.0) == 0.0
    assert time.perf_counter() - started < 1.0
    assert rewards._with_deadline(lambda: threading.current_thread().name, 5, "") == (
        "reward-deadline"
    )
    with pytest.raises(KeyError):
        rewards._with_deadline(lambda: {}["missing"], 5, 0.0)
