"""The leaderboard against a hand computation, failures included."""

import numpy as np
import pytest

from core.leaderboard import leaderboard


def test_leaderboard_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    #                 model   a     b
    preds = np.array([[1.5, 1.0, np.nan],
                      [np.nan, 2.5, 2.0],
                      [3.0, 5.0, 6.0],
                      [2.0, 4.0, 4.0]])
    t = leaderboard(preds, y, ["model", "a", "b"]).set_index("regressor")
    # model: errors .5, fail, 0, 2
    assert t.loc["model", "mse_mean"] == pytest.approx((0.25 + 0 + 4) / 3)
    assert t.loc["model", "mae_median"] == pytest.approx(0.5)
    assert t.loc["model", "failures"] == 1
    # a: errors 0, .5, 2, 0 -> beats model on seeds 0, 1 (model failed); loses seed 2; wins seed 3
    assert t.loc["a", "mse_mean"] == pytest.approx((0 + 0.25 + 4 + 0) / 4)
    assert t.loc["a", "mae_mean"] == pytest.approx(2.5 / 4)
    assert t.loc["a", "beats_model"] == pytest.approx(3 / 4)
    # b: errors fail, 0, 3, 0 -> wins seeds 1, 3
    assert t.loc["b", "failures"] == 1
    assert t.loc["b", "beats_model"] == pytest.approx(2 / 4)
    assert t.loc["model", "beats_model"] == 0
    # ranks per seed (1 best, failures last, ties averaged):
    # s0: a1 model2 b3 | s1: b1 a2 model3 | s2: model1 a2 b3 | s3: a1.5 b1.5 model3
    assert t.loc["a", "avg_rank"] == pytest.approx((1 + 2 + 2 + 1.5) / 4)
    assert t.loc["b", "avg_rank"] == pytest.approx((3 + 1 + 3 + 1.5) / 4)
    assert t.loc["model", "avg_rank"] == pytest.approx((2 + 3 + 1 + 3) / 4)
    assert list(t.index) == ["a", "model", "b"]  # sorted by mean squared error
