"""Specs to functions, labels and config errors, and the reward set's weights and failures."""

import pytest
from helpers import USER_REWARDS as USER

from rewards import builtin, synthetic
from rewards.lookup import BUILTINS, get_reward, register_reward, registered_rewards
from rewards.registry import RewardError, RewardFailureError, RewardSet, build_specs


def test_builtin_names_resolve_to_the_builtin_functions():
    assert get_reward("reverse_digits") is builtin.reverse_digits
    assert get_reward("format") is builtin.format_reward
    assert get_reward("synthetic_even") is synthetic.synthetic_even
    assert set(BUILTINS) <= set(registered_rewards())
    assert {"reverse_digits", "gsm8k", "format", "length_penalty", "code",
            "synthetic_even"} <= set(BUILTINS)


def test_registry_by_module_function_and_errors():
    assert get_reward("rewards.builtin:reverse_digits") is get_reward("reverse_digits")
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(RewardError, match="cannot import"):
        get_reward("no_such_module:fn")
    with pytest.raises(RewardError, match="does not exist"):
        get_reward("/no/such/file.py:fn")
    with pytest.raises(RewardError, match="has no function 'nope'"):
        get_reward(f"{USER}:nope")


def test_a_registered_name_cannot_be_taken_twice():
    def mine(prompt, completion, row):
        return 1.0

    with pytest.raises(RewardError, match="reward 'gsm8k' is already registered"):
        register_reward("gsm8k")(mine)
    # Registering the same function again is harmless.
    assert register_reward("reverse_digits")(builtin.reverse_digits) is builtin.reverse_digits


def test_labels_of_names_functions_and_files():
    specs = build_specs(["gsm8k", "rewards.builtin:format_reward", f"{USER}:exact",
                         str(USER), "gsm8k"])
    assert [s.label for s in specs] == ["gsm8k", "format_reward", "exact", "reward", "gsm8k_2"]
    # File paths are made absolute, so a worker process resolves them the same way.
    assert specs[2].spec == f"{USER.resolve()}:exact"
    assert specs[3].spec == f"{USER.resolve()}:reward"


def test_config_errors_name_the_field():
    with pytest.raises(RewardError, match="rewards.kwargs names \\['typo'\\]"):
        RewardSet(["gsm8k"], kwargs={"typo": {}})
    with pytest.raises(RewardError, match="rewards.component_weights keys \\['gsm8k'\\]"):
        RewardSet(["gsm8k"], component_weights={"gsm8k": 1.0})
    with pytest.raises(RewardError, match="rewards.weights has 1 entries for 2 functions"):
        build_specs(["gsm8k", "format"], [1.0])


def test_reward_set_weights_and_nan_is_counted_not_zeroed(tmp_path):
    rs = RewardSet(["reverse_digits", "reverse_digits"], [1.0, 0.5])
    totals, metrics = rs.score(["1="], ["1."], [{"target": "1"}])
    # r = 1.0 · 1.0 + 0.5 · 1.0; a repeated reward gets its own label.
    assert totals == [1.5]
    assert metrics["reward/reverse_digits"] == metrics["reward/reverse_digits_2"] == 1.0
    assert metrics["rewards/failures"] == 0.0

    path = tmp_path / "nan_reward.py"
    path.write_text("def nan_reward(prompt, completion, row):\n    return float('nan')\n")
    nan_reward = f"{path}:nan_reward"
    with pytest.raises(RewardFailureError, match=r"1/1 reward calls failed \(nonfinite=1\)"):
        RewardSet([nan_reward]).score(["1="], ["1."], [{"target": "1"}])
    # Tolerated failures score the fallback and are counted.
    totals, metrics = RewardSet([nan_reward, "reverse_digits"], fallback_score=-2.0,
                                max_failure_fraction=1.0).score(["1="], ["1."], [{"target": "1"}])
    assert totals == [-2.0 + 1.0]
    assert metrics["rewards/failures_nonfinite"] == 1.0 and metrics["rewards/failures"] == 1.0
