"""Explanations of single predictions with captum.

- Images (CNN): Grad-CAM (``LayerGradCam``) on the last convolutional block, upsampled
  to the image: where in the map the evidence for the explained class lies.
- Tables (MLP) and text classifiers: SHAP values, each feature's Shapley value against
  the all-zeros model input, estimated by captum's ``ShapleyValueSampling`` over random
  feature orders. A table's features are its columns (a one-hot block and a missing
  indicator move with their feature) and its reference row, with the default standard
  scaling and one-hot encoding, has every numeric feature at its training mean and no
  category (with minmax scaling at its training minimum, with ordinal encoding the
  first category); a text's features are its tokens and its reference is the empty
  text (all padding).
  In every order the features' values add up to the output minus the reference's, so
  the estimate does too: how much each feature or token moved the output.

Classifiers are explained for a class (the predicted one unless asked), regressors for
their value. Forecasters, language models and generative models are refused by name.
"""

from __future__ import annotations

import numpy as np
import torch

#: Random feature orders SHAP values average over (captum's default is 25).
SHAP_ORDERS = 32
#: Features or tokens reported per row, by absolute attribution.
TOP_K = 8


def explainable(loaded) -> str:
    """How a loaded model is explained ("gradcam", "table", "text"), or ValueError."""
    return explanation_method(loaded.config, loaded.preprocessor.describe()["kind"])


def explanation_method(cfg, inputs: str) -> str:
    """How the model of experiment ``cfg`` that reads ``inputs`` (a preprocessor's kind)
    is explained, or ValueError saying why it is not."""
    task = cfg.task.kind
    if task not in ("classification", "regression"):
        raise ValueError(
            f"{cfg.name} is a {task} model; explanations cover classifiers and "
            "regressors of images, tables and text"
        )
    if inputs == "image" and cfg.model.kind == "cnn":
        return "gradcam"
    if inputs == "tabular":
        return "table"
    if inputs == "text":
        return "text"
    raise ValueError(f"{cfg.name}: no explanation method for {inputs} inputs")


def _targets(loaded, outputs: torch.Tensor, target: str | None) -> torch.Tensor | None:
    """The output index each row is explained for: a named class, else the predicted
    one; None for a regressor's single output."""
    if loaded.config.task.kind == "regression":
        return None
    names = list(loaded.task.class_names)
    if target is None:
        return outputs.argmax(1)
    if target not in names:
        raise ValueError(f"target: {target!r} is not a class of {loaded.config.name} ({names})")
    return torch.full((len(outputs),), names.index(target), dtype=torch.long)


def _forward(loaded):
    """The model as captum calls it: a classifier's class scores (logits), a regressor's
    predicted value in the target's units, so that its attributions are in them too."""
    model = loaded.model
    if loaded.config.task.kind != "regression":
        return model
    return lambda x: loaded.task.predict(model(x))


def gradcam(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(N, H, W) Grad-CAM maps, ReLU'd and upsampled to the input, each summing to 1
    (all zeros where nothing speaks for the class)."""
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(model, model.features[-1][-2])
    maps = cam.attribute(inputs, target=targets, relu_attributions=True)
    maps = LayerAttribution.interpolate(maps, inputs.shape[-2:], interpolate_mode="bilinear")
    maps = maps.clamp(min=0).squeeze(1).detach().numpy()
    totals = maps.reshape(len(maps), -1).sum(1)[:, None, None]
    return np.divide(maps, totals, out=np.zeros_like(maps), where=totals > 0)


def shapley_sampling(forward, inputs: torch.Tensor, targets, features: torch.Tensor):
    """(N, D) SHAP values over the model's inputs, against the all-zeros input: each
    column's entry in ``features`` ((1, D) or (N, D)) names its feature, and every column
    of a feature carries the feature's value. The orders are drawn from a fixed seed, so
    a row gets the same values every time it is explained."""
    from captum.attr import ShapleyValueSampling

    with torch.random.fork_rng(devices=[]):  # the CPU's generator only: no CUDA set-up
        torch.default_generator.manual_seed(0)
        values = ShapleyValueSampling(forward).attribute(
            inputs,
            baselines=0,
            target=targets,
            feature_mask=features,
            n_samples=SHAP_ORDERS,
            perturbations_per_eval=int(features.max()) + 1,
        )
    return values.detach()


def shap_values(forward, inputs: torch.Tensor, targets, groups: np.ndarray) -> np.ndarray:
    """(N, F) SHAP values of the F features that ``groups`` (a feature index per input
    column) makes of a table's columns."""
    values = shapley_sampling(forward, inputs, targets, torch.from_numpy(groups)[None, :])
    first_columns = [int(np.flatnonzero(groups == f)[0]) for f in range(int(groups.max()) + 1)]
    return values[:, first_columns].numpy()


def token_shap_values(forward, ids: torch.Tensor, targets) -> np.ndarray:
    """(N, L) SHAP values of each text's tokens, a text at a time: its features, and so
    the orders sampled, are its own, not those of the texts explained beside it."""
    rows = []
    for i in range(len(ids)):
        text = ids[i : i + 1]
        target = None if targets is None else targets[i : i + 1]
        rows.append(shapley_sampling(forward, text, target, token_features(text)))
    return torch.cat(rows).numpy()


def token_features(ids: torch.Tensor) -> torch.Tensor:
    """Each real token of (N, L) ids a feature of its own, named by its position; all
    padding one more feature, which moves nothing (padding never changes a prediction).
    Sampling then costs as many evaluations per order as the text has tokens (one more
    with padding), not its padded length."""
    real = ids != 0
    used = int(torch.nonzero(real.any(0)).max()) + 1 if real.any() else 0
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return torch.where(real, positions, torch.full_like(ids, used))


def shap_importance(loaded, inputs: np.ndarray) -> list[tuple[str, float]]:
    """Each feature of a table model with its mean absolute SHAP value over the rows of
    model ``inputs``, each row explained for its own prediction; largest first."""
    model = loaded.model.eval()
    rows = torch.from_numpy(inputs)
    with torch.no_grad():
        outputs = model(rows)
    features, groups = loaded.preprocessor.feature_groups()
    values = shap_values(_forward(loaded), rows, _targets(loaded, outputs, None), groups)
    ranked = zip(features, np.abs(values).mean(0).tolist(), strict=True)
    return sorted(ranked, key=lambda pair: -pair[1])


def token_importance(loaded, ids: np.ndarray) -> list[tuple[str, float]]:
    """Each token (as the vocabulary spells it) of a text model's (N, L) token ``ids``
    with its SHAP values' absolute sum over every place it occurs, per text: how far it
    moves a text's explained output on average; largest first."""
    model = loaded.model.eval()
    rows = torch.from_numpy(ids)
    with torch.no_grad():
        outputs = model(rows)
    values = token_shap_values(_forward(loaded), rows, _targets(loaded, outputs, None))
    totals: dict[str, float] = {}
    for row in loaded.preprocessor.token_attributions(ids, values):
        for place, value in row:
            token = place.partition(":")[2]
            totals[token] = totals.get(token, 0.0) + abs(value)
    ranked = [(token, total / len(ids)) for token, total in totals.items()]
    return sorted(ranked, key=lambda pair: -pair[1])


def explain(loaded, columns: dict[str, np.ndarray], target: str | None = None) -> list[dict]:
    """Per row of raw ``columns`` (what ``request_columns`` gives): the prediction, what
    it is explained for, and the attributions (a heat-map, or top features or tokens)."""
    explainable(loaded)
    return explain_inputs(loaded, loaded.preprocessor.transform(columns)["inputs"], target)


def explain_inputs(loaded, inputs: np.ndarray, target: str | None = None) -> list[dict]:
    """``explain`` of rows already turned into model inputs (a test split's)."""
    method = explainable(loaded)
    model = loaded.model.eval()
    inputs = torch.from_numpy(inputs)
    with torch.no_grad():
        outputs = model(inputs)
    records = loaded.task.prediction_records(loaded.task.predict(outputs).numpy())
    targets = _targets(loaded, outputs, target)
    explained_for = (
        ["value"] * len(records)
        if targets is None
        else [loaded.task.class_names[int(i)] for i in targets]
    )
    if method == "gradcam":
        maps = gradcam(model, inputs, targets)
        return [
            {
                "prediction": record,
                "explained": name,
                "method": "gradcam",
                "heatmap": heatmap.round(5).tolist(),
            }
            for record, name, heatmap in zip(records, explained_for, maps, strict=True)
        ]
    if method == "table":
        features, groups = loaded.preprocessor.feature_groups()
        values = shap_values(_forward(loaded), inputs, targets, groups)
        per_feature = [list(zip(features, row.tolist(), strict=True)) for row in values]
    else:
        values = token_shap_values(_forward(loaded), inputs, targets)
        per_feature = loaded.preprocessor.token_attributions(inputs.numpy(), values)
    return [
        {
            "prediction": record,
            "explained": name,
            "method": "shap",
            "attributions": [
                {"feature": feature, "attribution": round(float(value), 6)}
                for feature, value in sorted(row, key=lambda item: -abs(item[1]))[:TOP_K]
            ],
        }
        for record, name, row in zip(records, explained_for, per_feature, strict=True)
    ]
