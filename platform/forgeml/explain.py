"""Explanations of single predictions with captum.

- Images (CNN): Grad-CAM (``LayerGradCam``) on the last convolutional block, upsampled
  to the image: where in the map the evidence for the explained class lies.
- Tables (MLP): Integrated Gradients from the all-zeros input, which after the fitted
  scaling is the training mean of every numeric feature; one-hot blocks and missing
  indicators are summed into their feature: how much each feature moved the output.
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


def _forward(model: torch.nn.Module, regression: bool):
    """The model as captum calls it: one output per row for a regressor."""
    if not regression:
        return model
    return lambda x: model(x).reshape(len(x), -1)[:, 0]


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


def explain(loaded, columns: dict[str, np.ndarray], target: str | None = None) -> list[dict]:
    """Per row of raw ``columns`` (what ``request_columns`` gives): the prediction, what
    it is explained for, and the attributions (a heat-map, or top features or tokens)."""
    explainable(loaded)
    return explain_inputs(loaded, loaded.preprocessor.transform(columns)["inputs"], target)


def explain_inputs(loaded, inputs: np.ndarray, target: str | None = None) -> list[dict]:
    """``explain`` of rows already turned into model inputs (a test split's)."""
    # captum takes 1.5 s to import: only where an explanation is asked for.
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    method = explainable(loaded)
    model = loaded.model.eval()
    regression = loaded.config.task.kind == "regression"
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
            {"prediction": record, "explained": name, "heatmap": heatmap.round(5).tolist()}
            for record, name, heatmap in zip(records, explained_for, maps, strict=True)
        ]
    if method == "table":
        attributions = IntegratedGradients(_forward(model, regression)).attribute(
            inputs, baselines=torch.zeros_like(inputs), target=targets, n_steps=IG_STEPS
        )
        per_feature = loaded.preprocessor.feature_attributions(attributions.detach().numpy())
    else:
        embeddings = LayerIntegratedGradients(_forward(model, regression), model.tokens)
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
            "attributions": [
                {"feature": feature, "attribution": round(float(value), 6)}
                for feature, value in sorted(row, key=lambda item: -abs(item[1]))[:TOP_K]
            ],
        }
        for record, name, row in zip(records, explained_for, per_feature, strict=True)
    ]
