"""Weights a model starts from that the training data decides: fitted in the driver
before training, handed to every rank in the loop config, loaded before DDP wraps the
model (a resumed run loads its checkpoint over them).

A forecaster with ``model.autoregressive`` starts its linear part at the ridge
regression (penalty chosen by leave-one-out) of the training windows' standardised
targets, less the naive forecast that the model adds anyway, on the windows' values:
so the forecaster starts where a linear autoregression fitted to the series ends, and
the network learns only what that misses. On a short series a few dozen optimizer steps
cannot get the zero-initialised part there (a year of daily births: 221 windows).
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import RidgeCV

from forgeml.baselines import training_rows
from forgeml.config import ExperimentConfig
from forgeml.data.pipeline import PreparedData
from forgeml.models.series import AUTOREGRESSION, naive_steps


def initial_weights(cfg: ExperimentConfig, data: PreparedData) -> dict[str, list]:
    """Parameter name to its starting value (nested lists), for the parameters the data
    decides; empty when none does."""
    if not getattr(cfg.model, "autoregressive", False):
        return {}
    pre = data.preprocessor
    x, y = training_rows(data.train, data.sizes["train"], pre, cfg.seed)
    if x is None:
        return {}
    values = x[..., 0].astype(np.float64)
    target = (y.astype(np.float64) - pre.mean) / pre.std
    residual = target - values[:, naive_steps(pre.window, pre.horizon, pre.season)]
    observed = np.isfinite(residual).all(1)
    if observed.sum() < 2:
        return {}
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(values[observed], residual[observed])
    return {
        f"{AUTOREGRESSION}.weight": ridge.coef_.reshape(pre.horizon, pre.window).tolist(),
        f"{AUTOREGRESSION}.bias": np.atleast_1d(ridge.intercept_).tolist(),
    }
