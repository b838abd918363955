"""Explanations of single predictions with captum.

- Images (CNN): Grad-CAM (``LayerGradCam``) on the last convolutional block, upsampled
  to the image: where in the map the evidence for the explained class lies.
- Tables (MLP): SHAP values, each feature's Shapley value against the reference input
  (all zeros: after the fitted scaling every numeric feature at its training mean, no
  category), a one-hot block and a missing indicator moving with their feature;
  estimated by captum's ``ShapleyValueSampling`` over random feature orders. In every
  order the features' values add up to the output minus the reference's output, so the
  estimate does too: how much each feature moved the output from the average row's.
- Text (Transformer or RNN classifier): Integrated Gradients through the token
  embedding (``LayerIntegratedGradients``) from the padding embedding; each token's
  share is the sum over its embedding.

Classifiers are explained for a class (the predicted one unless asked), regressors for
their value. Forecasters, language models and generative models are refused by name.
"""

from __future__ import annotations

import numpy as np
import torch

#: Interpolation steps of Integrated Gradients (captum's default is 50).
IG_STEPS = 64
#: Random feature orders a table's SHAP values average over (captum's default is 25).
SHAP_ORDERS = 32
#: Features or tokens reported per row, by absolute attribution.
TOP_K = 8


def explainable(loaded) -> str:
    """How a loaded model is explained ("gradcam", "table", "text"), or ValueError."""
    task, kind = loaded.config.task.kind, loaded.preprocessor.describe()["kind"]
    if task not in ("classification", "regression"):
        raise ValueError(
            f"{loaded.config.name} is a {task} model; explanations cover classifiers and "
            "regressors of images, tables and text"
        )
    if kind == "image" and loaded.config.model.kind == "cnn":
        return "gradcam"
    if kind == "tabular":
        return "table"
    if kind == "text":
        return "text"
    raise ValueError(f"{loaded.config.name}: no explanation method for {kind} inputs")


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


def shap_values(forward, inputs: torch.Tensor, targets, groups: np.ndarray) -> np.ndarray:
    """(N, F) SHAP values of the F features that ``groups`` (a feature index per input
    column) makes of the columns, against the all-zeros reference input. The orders are
    drawn from a fixed seed, so a row gets the same values every time it is explained."""
    from captum.attr import ShapleyValueSampling

    features = int(groups.max()) + 1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        values = ShapleyValueSampling(forward).attribute(
            inputs,
            target=targets,
            feature_mask=torch.from_numpy(groups)[None, :],
            n_samples=SHAP_ORDERS,
            perturbations_per_eval=features,
        )
    # Every column of a feature carries the feature's value.
    first_columns = [int(np.flatnonzero(groups == feature)[0]) for feature in range(features)]
    return values[:, first_columns].detach().numpy()


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


def explain(loaded, columns: dict[str, np.ndarray], target: str | None = None) -> list[dict]:
    """Per row of raw ``columns`` (what ``request_columns`` gives): the prediction, what
    it is explained for, and the attributions (a heat-map, or top features or tokens)."""
    explainable(loaded)
    return explain_inputs(loaded, loaded.preprocessor.transform(columns)["inputs"], target)


def explain_inputs(loaded, inputs: np.ndarray, target: str | None = None) -> list[dict]:
    """``explain`` of rows already turned into model inputs (a test split's)."""
    # captum takes 1.5 s to import: only where an explanation is asked for.
    from captum.attr import LayerIntegratedGradients

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
        embeddings = LayerIntegratedGradients(_forward(loaded), model.tokens)
        attributions = embeddings.attribute(
            inputs, baselines=torch.zeros_like(inputs), target=targets, n_steps=IG_STEPS
        )
        per_feature = loaded.preprocessor.token_attributions(
            inputs.numpy(), attributions.sum(-1).detach().numpy()
        )
    return [
        {
            "prediction": record,
            "explained": name,
            "method": "shap" if method == "table" else "integrated_gradients",
            "attributions": [
                {"feature": feature, "attribution": round(float(value), 6)}
                for feature, value in sorted(row, key=lambda item: -abs(item[1]))[:TOP_K]
            ],
        }
        for record, name, row in zip(records, explained_for, per_feature, strict=True)
    ]
