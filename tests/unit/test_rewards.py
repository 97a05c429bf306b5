import pytest

from controller.config import DataConfig
from controller.data import TaskDataset, digits_tokenizer, reverse_digits_row
from rewards.registry import (
    RewardError,
    RewardFailureError,
    RewardSet,
    get_reward,
    registered_rewards,
)


def test_reverse_digits_partial_credit():
    r = get_reward("reverse_digits")
    row = {"target": "321"}
    assert r("123=", "321.", row) == 1.0
    assert r("123=", "321", row) == pytest.approx(0.9)  # right digits, no stop token
    assert r("123=", "391.", row) == pytest.approx(2 / 3)
    assert r("123=", "3214.", row) == pytest.approx(3 / 4)  # an extra digit costs credit
    assert r("123=", ".", row) == 0.0


def test_registry_by_module_function_and_errors():
    assert "reverse_digits" in registered_rewards()
    assert get_reward("rewards.builtin:reverse_digits") is get_reward("reverse_digits")
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(RewardError, match="cannot import"):
        get_reward("no_such_module:fn")


def test_reward_set_weights_and_nan_is_counted_not_zeroed(monkeypatch):
    rs = RewardSet(["reverse_digits", "reverse_digits"], [1.0, 0.5])
    totals, metrics = rs.score(["1="], ["1."], [{"target": "1"}])
    # r = 1.0 · 1.0 + 0.5 · 1.0; a repeated reward gets its own label.
    assert totals == [1.5]
    assert metrics["reward/reverse_digits"] == metrics["reward/reverse_digits_2"] == 1.0
    assert metrics["rewards/failures"] == 0.0
    import rewards.registry as reg

    monkeypatch.setitem(reg._REGISTRY, "nan_reward", lambda p, c, r: float("nan"))
    with pytest.raises(RewardFailureError, match=r"1/1 reward calls failed \(nonfinite=1\)"):
        RewardSet(["nan_reward"]).score(["1="], ["1."], [{"target": "1"}])
    # Tolerated failures score the fallback and are counted.
    totals, metrics = RewardSet(["nan_reward", "reverse_digits"], fallback_score=-2.0,
                                max_failure_fraction=1.0).score(["1="], ["1."], [{"target": "1"}])
    assert totals == [-2.0 + 1.0]
    assert metrics["rewards/failures_nonfinite"] == 1.0 and metrics["rewards/failures"] == 1.0


def test_task_rows_are_deterministic_and_resumable():
    a = [reverse_digits_row(0, i, 2, 4) for i in range(5)]
    assert a == [reverse_digits_row(0, i, 2, 4) for i in range(5)]
    assert all(row["target"] == row["prompt"][:-1][::-1] for row in a)
    ds = TaskDataset(DataConfig(prompts_per_step=3), digits_tokenizer())
    first = ds.next_batch()
    resumed = TaskDataset(DataConfig(prompts_per_step=3), digits_tokenizer(), position=3)
    assert resumed.next_batch().rows == ds.next_batch().rows
    assert first.mask_PxL[:, -1].all()  # left-padded: the last column is always real
