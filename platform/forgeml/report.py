"""The run report: one self-contained HTML page in the model package (``report.html``).

Written at registration and again by ``forgeml report``, from the package alone:
``metrics.json`` (history, test metrics, confusion matrix), ``evaluation.npz`` (the test
split's per-row outputs and targets, the first rows' model inputs as examples, and for a
table more of its rows for the SHAP summary),
``MODEL_CARD.md`` and the model itself for explanations. Plots are matplotlib PNGs
embedded as data URIs; the page fetches nothing.
"""

from __future__ import annotations

import html
import io
import math

import markdown
import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_precision_recall_curve, multiclass_roc

from forgeml.data.images import WAFER_MAX
from forgeml.explain import (
    explain_inputs,
    explainable,
    explanation_method,
    shap_importance,
    token_importance,
)
from forgeml.monitor.report import STYLE, data_uri, plt, png_bytes, png_data_uri
from forgeml.tasks.generative import WAFER_COLOURS
from forgeml.tracking import scalar_metrics

EVALUATION_FILE = "evaluation.npz"
REPORT_FILE = "report.html"
#: Test rows kept as examples (shown with their predictions and explanations).
EXAMPLES = 8
#: Test rows of a table, and texts, that the report's SHAP summary averages over (a
#: text costs a sampling run of its own: 12 texts of 48 tokens take a few seconds).
SHAP_SUMMARY_ROWS = {"table": 200, "text": 12}
#: Tokens the text SHAP summary shows.
SUMMARY_TOKENS = 20
#: ROC and precision-recall curves drawn at most (the most frequent classes).
MAX_CURVES = 10


def shap_summary_rows(cfg, data) -> int:
    """Test rows the SHAP summary of experiment ``cfg``'s model averages over: none
    unless SHAP values explain it (tables and text)."""
    try:
        method = explanation_method(cfg, data.preprocessor.describe()["kind"])
    except ValueError:
        return 0
    return SHAP_SUMMARY_ROWS.get(method, 0)


def evaluation_arrays(
    outputs: np.ndarray, targets: np.ndarray, examples: dict, summary_rows: int
) -> bytes:
    """``evaluation.npz``: per test row the task's outputs and targets, the model inputs
    and targets of ``EXAMPLES`` rows of ``examples`` (a batch of the test split), and the
    inputs of up to ``summary_rows`` of them for the SHAP summary."""
    buffer = io.BytesIO()
    summary = {"summary_inputs": examples["inputs"][:summary_rows]} if summary_rows else {}
    np.savez_compressed(
        buffer,
        outputs=outputs,
        targets=targets,
        examples=examples["inputs"][:EXAMPLES],
        example_targets=examples["target"][:EXAMPLES],
        **summary,
    )
    return buffer.getvalue()


def read_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as arrays:
        return {name: arrays[name] for name in arrays.files}


def _img(figure, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='{png_data_uri(figure)}'>"


def learning_curves(history: list[dict], best_epoch: int) -> str:
    """Losses, validation metrics and the learning rate per epoch; the kept epoch marked."""
    epochs = [record["epoch"] for record in history]
    metrics = [k for k in history[0] if k.startswith("val_") and k != "val_loss"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for name in ("train_loss", "val_loss"):
        axes[0].plot(epochs, [r[name] for r in history], marker=".", label=name)
    for name in metrics:
        axes[1].plot(epochs, [r.get(name) for r in history], marker=".", label=name)
    axes[2].plot(epochs, [r["lr"] for r in history], marker=".", color="grey")
    for ax, title in zip(axes, ("loss", "validation metrics", "learning rate"), strict=True):
        ax.axvline(best_epoch, color="green", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        if ax is not axes[2]:
            ax.legend(fontsize=7)
    return _img(figure, "learning curves")


def confusion_matrix(confusion: dict) -> str:
    matrix = np.asarray(confusion["matrix"], dtype=float)
    labels = confusion["labels"]
    figure, ax = plt.subplots(figsize=(0.5 * len(labels) + 2.5, 0.5 * len(labels) + 2))
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        colour = "white" if shares[i, j] > 0.5 else "black"
        ax.text(j, i, int(count), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    return _img(figure, "confusion matrix")


def roc_and_pr(probabilities: np.ndarray, targets: np.ndarray, classes: list[str]) -> str:
    """One-vs-rest ROC and precision-recall curves (torchmetrics) of the most frequent
    classes in the test split."""
    preds, target = torch.from_numpy(probabilities).float(), torch.from_numpy(targets).long()
    k = len(classes)
    fpr, tpr, _ = multiclass_roc(preds, target, num_classes=k)
    precision, recall, _ = multiclass_precision_recall_curve(preds, target, num_classes=k)
    shown = np.argsort(-np.bincount(targets.astype(np.int64), minlength=k))[:MAX_CURVES]
    figure, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for c in shown:
        roc_ax.plot(fpr[c], tpr[c], label=classes[c], linewidth=1)
        pr_ax.plot(recall[c], precision[c], label=classes[c], linewidth=1)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall")
    roc_ax.legend(fontsize=6)
    return _img(figure, "ROC and precision-recall curves")


def predicted_vs_actual(predicted: np.ndarray, actual: np.ndarray, unit: str) -> str:
    observed = np.isfinite(actual)
    predicted, actual = predicted[observed], actual[observed]
    figure, (scatter, residuals) = plt.subplots(1, 2, figsize=(10, 3.8))
    scatter.scatter(actual, predicted, s=6, alpha=0.5)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    scatter.plot([low, high], [low, high], color="grey", linestyle=":")
    scatter.set(xlabel=f"actual {unit}", ylabel=f"predicted {unit}", title="predicted vs actual")
    residuals.hist(predicted - actual, bins=30, color="#4c72b0")
    residuals.set(xlabel=f"predicted - actual {unit}", title="residuals")
    return _img(figure, "predicted vs actual")


def example_forecasts(loaded, examples: np.ndarray, truth: np.ndarray) -> str:
    """Example windows: history (de-standardised), forecast and what happened."""
    with torch.no_grad():
        forecasts = loaded.task.predict(loaded.model(torch.from_numpy(examples))).numpy()
    preprocessor = loaded.preprocessor
    shown = min(4, len(examples))
    figure, axes = plt.subplots(1, shown, figsize=(3.3 * shown, 2.8), squeeze=False)
    for i, ax in enumerate(axes[0]):
        history = examples[i, :, 0] * preprocessor.std + preprocessor.mean
        history[examples[i, :, 1] == 0] = np.nan
        past = np.arange(-len(history), 0)
        ahead = np.arange(len(forecasts[i]))
        ax.plot(past, history, color="black", linewidth=1, label="history")
        ax.plot(ahead, truth[i], color="green", marker=".", linewidth=1, label="actual")
        ax.plot(ahead, forecasts[i], color="#dd8452", marker=".", linewidth=1, label="forecast")
        ax.set_title(f"test window {i}", fontsize=8)
    axes[0][0].legend(fontsize=6)
    return _img(figure, "example forecasts")


def _display(loaded, inputs: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) RGB images of model inputs: wafer maps in die colours, grey images
    as grey, colour ones as they are."""
    preprocessor = loaded.preprocessor
    levels = preprocessor.raw_levels(inputs if inputs.ndim == 4 else inputs[:, None])
    if preprocessor.max_value == WAFER_MAX:
        return WAFER_COLOURS[levels[..., 0]]
    shown = (levels * 255 // preprocessor.max_value).astype(np.uint8)
    return shown if shown.shape[-1] == 3 else np.repeat(shown, 3, -1)


def _image_grid(loaded, inputs: np.ndarray, titles: list[str], heatmaps=None):
    """A figure of images with titles, each with its Grad-CAM below it if given."""
    images = _display(loaded, inputs)
    columns = min(8, len(images))
    per_image = 2 if heatmaps is not None else 1
    rows = math.ceil(len(images) / columns) * per_image
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, image in enumerate(images):
        row, col = divmod(i, columns)
        ax = axes[row * per_image][col]
        ax.imshow(image, interpolation="nearest")
        ax.set_title(titles[i], fontsize=6)
        if heatmaps is not None:
            below = axes[row * per_image + 1][col]
            below.imshow(image, interpolation="nearest")
            below.imshow(heatmaps[i], cmap="jet", alpha=0.5, interpolation="bilinear")
            below.set_title("Grad-CAM", fontsize=6)
    return figure


def image_examples(loaded, inputs: np.ndarray, titles: list[str], heatmaps=None) -> str:
    """Test images with their true and predicted classes, and Grad-CAM over them."""
    return _img(_image_grid(loaded, inputs, titles, heatmaps), "example predictions")


def explanation_png(loaded, inputs: np.ndarray, titles: list[str], heatmaps: np.ndarray) -> bytes:
    """``forgeml explain --output``: the inputs and their Grad-CAM heat-maps."""
    return png_bytes(_image_grid(loaded, inputs, titles, heatmaps))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _label_titles(loaded, outputs: np.ndarray, targets: np.ndarray) -> list[str]:
    names = loaded.task.class_names
    return [
        f"true {names[int(t)]}\npred {names[int(p)]}"
        for t, p in zip(targets, outputs.argmax(1), strict=True)
    ]


def _ranked_bars(ranked: list[tuple[str, float]], label: str):
    """A horizontal bar chart of named values, the first on top."""
    ranked = ranked[::-1]
    figure, ax = plt.subplots(figsize=(6, 0.3 * len(ranked) + 1.2))
    ax.barh([name for name, _ in ranked], [value for _, value in ranked], color="#4c72b0")
    ax.tick_params(labelsize=7)
    ax.set_xlabel(label, fontsize=8)
    return figure


def _explained_output(loaded) -> str:
    return "value" if loaded.config.task.kind == "regression" else "predicted class's logit"


def shap_summary(loaded, inputs: np.ndarray) -> str:
    """A table model's features by mean absolute SHAP value over test rows; a text
    model's most telling tokens by their absolute SHAP values per text."""
    output = _explained_output(loaded)
    if explainable(loaded) == "text":
        ranked = token_importance(loaded, inputs)[:SUMMARY_TOKENS]
        figure = _ranked_bars(ranked, f"|SHAP value| per text ({output})")
        caption = (
            f"The {len(ranked)} tokens that move the explained output most over "
            f"{len(inputs)} test texts, each explained for its {output}: a token's "
            "absolute SHAP values summed over every place it occurs, divided by the "
            "number of texts (the reference is the empty text)."
        )
        return f"<p>{html.escape(caption)}</p>" + _img(figure, "SHAP summary")
    figure = _ranked_bars(shap_importance(loaded, inputs), f"mean |SHAP value| ({output})")
    caption = (
        f"Mean absolute SHAP value of each feature over {len(inputs)} test rows, each row "
        f"explained for its {output}: how far a feature moves it, on average, from the "
        "reference row's (the all-zeros model input: by default every numeric feature at "
        "its training mean and no category)."
    )
    return f"<p>{html.escape(caption)}</p>" + _img(figure, "SHAP summary")


def attributions_png(explained: list[dict]) -> bytes:
    """``forgeml explain --output`` for tables and text: per explained row, its largest
    SHAP values as bars (red raise the explained output, blue lower it)."""
    figure, axes = plt.subplots(len(explained), 1, figsize=(6, 2.4 * len(explained)), squeeze=False)
    for i, (ax, row) in enumerate(zip(axes[:, 0], explained, strict=True)):
        ranked = [(a["feature"], a["attribution"]) for a in row["attributions"]][::-1]
        colours = ["#c44e52" if value > 0 else "#4c72b0" for _, value in ranked]
        ax.barh([name for name, _ in ranked], [value for _, value in ranked], color=colours)
        ax.axvline(0, color="black", linewidth=0.5)
        ax.tick_params(labelsize=7)
        ax.set_title(f"instance {i}: SHAP values for {row['explained']}", fontsize=8)
    figure.tight_layout()
    return png_bytes(figure)


def selection_section(selection: dict) -> str:
    """The encoded columns a table's model reads, with their variance and score, and
    how many were left out."""
    kept = [column for column in selection["columns"] if column["kept"]]
    if selection["score"]:
        kept.sort(key=lambda column: -column["score"])
    score = {"f_test": "F statistic", "mutual_info": "mutual information (nats)"}.get(
        selection["score"]
    )
    rows = [
        [
            column["name"],
            f"{column['variance']:.4g}",
            *([f"{column['score']:.4g}"] if score else []),
        ]
        for column in kept
    ]
    left_out = [column["name"] for column in selection["columns"] if not column["kept"]]
    caption = (
        f"The model reads {len(kept)} of {len(selection['columns'])} encoded columns, chosen "
        "on the training split"
        + (f" by {score} with the target" if score else " by their variance")
        + f". Left out: {', '.join(left_out) or 'none'}."
    )
    header = ["column", "training variance", *([score] if score else [])]
    return f"<p>{html.escape(caption)}</p>" + _table(header, rows)


def pca_section(pca: dict) -> str:
    """Each principal component's share of the variance, cumulated, with the number kept."""
    ratio = np.asarray(pca["explained_variance_ratio"])
    kept = len(pca["components"])
    figure, ax = plt.subplots(figsize=(6, 3.2))
    positions = np.arange(1, len(ratio) + 1)
    ax.bar(positions, ratio, color="#4c72b0", label="component")
    ax.plot(positions, np.cumsum(ratio), color="#dd8452", marker=".", label="cumulative")
    ax.axvline(kept + 0.5, color="grey", linestyle="--", label=f"{kept} kept")
    ax.set(xlabel="principal component", ylabel="share of the variance", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    caption = (
        f"PCA fitted on the training split: the model reads {kept} components, which explain "
        f"{ratio[:kept].sum():.1%} of the variance of the {len(ratio)} columns they are made of."
    )
    return f"<p>{html.escape(caption)}</p>" + _img(figure, "PCA explained variance")


def _examples_section(loaded, arrays: dict) -> str:
    """Sample predictions on example test rows, with their explanations: images with
    Grad-CAM, or the largest SHAP values of table and text rows."""
    task = loaded.config.task.kind
    try:
        method = explainable(loaded)
    except ValueError:
        method = None
    images = loaded.preprocessor.describe()["kind"] == "image"
    if method is None and not (images and task == "classification"):
        return ""
    examples, targets = arrays["examples"], arrays["example_targets"]
    if method in ("table", "text"):
        rows = []
        for i, row in enumerate(explain_inputs(loaded, examples)):
            if task == "classification":
                actual, predicted = (
                    loaded.task.class_names[int(targets[i])],
                    row["prediction"]["label"],
                )
            else:
                actual, predicted = f"{targets[i]:.4g}", f"{row['prediction']['value']:.4g}"
            top = ", ".join(
                f"{a['feature']} {a['attribution']:+.3g}" for a in row["attributions"][:5]
            )
            rows.append([i, actual, predicted, top])
        return _table(["row", "actual", "predicted", "largest SHAP values"], rows)
    with torch.no_grad():
        outputs = loaded.task.predict(loaded.model(torch.from_numpy(examples))).numpy()
    heatmaps, caption = None, "Test images with their true and predicted classes."
    if method == "gradcam":
        heatmaps = np.array([row["heatmap"] for row in explain_inputs(loaded, examples)])
        caption = (
            "Test images with their true and predicted classes; below each, the Grad-CAM "
            "of its predicted class (captum, last convolution): where the evidence lies."
        )
    titles = _label_titles(loaded, outputs, targets)
    return f"<p>{caption}</p>" + image_examples(loaded, examples, titles, heatmaps)


def baseline_section(baseline: dict) -> str:
    """The baseline beside the model on its headline metrics, with the warning if the
    model does worse."""
    rows = [
        [
            row["metric"],
            f"{row['model']:.5g}",
            f"{row['baseline']:.5g}",
            "yes" if row["worse"] else "no",
        ]
        for row in baseline["compared"]
    ]
    about = (
        f"{baseline['model']}, fitted on {baseline['train_rows']} training rows in "
        f"{baseline['fit_s']} s and scored on the same test rows as the model."
        if "train_rows" in baseline
        else f"{baseline['model']}, scored on the same held-out episodes as the policy."
    )
    parts = [
        f"<p>{html.escape(about)}</p>",
        _table(["test metric", "model", "baseline", "model is worse"], rows),
    ]
    if baseline["warning"]:
        parts.append(f"<p class='warning'>{html.escape(baseline['warning'])}</p>")
    return "".join(parts)


def run_report(ref: str, loaded, metrics: dict, arrays: dict, files: dict[str, bytes]) -> str:
    """The report page of a model package (``files``: its files by name)."""
    task = loaded.config.task.kind
    run = metrics["run"]
    sections = [
        f"<h1>{html.escape(ref)}</h1>",
        "<p>"
        + html.escape(
            f"{loaded.config.model.kind} for {task}; run {run['name']}, {metrics['status']} "
            f"after {len(metrics['history'])} epochs, best epoch {metrics['best_epoch']} "
            f"({metrics['selected_by']['metric']}, {metrics['selected_by']['mode']}); "
            f"{run.get('wall_s', '?')} s; registered {metrics.get('registered_at', '?')}"
        )
        + "</p>",
        "<h2>Test metrics</h2>",
        _table(
            ["metric", "value"],
            [[name, f"{value:.5g}"] for name, value in scalar_metrics(metrics["test"]).items()],
        ),
        *(
            ["<h2>Baseline</h2>", baseline_section(metrics["baseline"])]
            if "baseline" in metrics
            else []
        ),
        "<h2>Learning curves</h2>",
        learning_curves(metrics["history"], metrics["best_epoch"]),
    ]
    outputs, targets = arrays["outputs"], arrays["targets"]
    if task == "classification":
        sections += [
            "<h2>Confusion matrix</h2>",
            confusion_matrix(metrics["test"]["confusion_matrix"]),
            "<h2>ROC and precision-recall</h2>",
            roc_and_pr(outputs, targets, list(loaded.task.class_names)),
        ]
    elif task == "regression":
        unit = loaded.preprocessor.target.name or ""
        sections += ["<h2>Predicted vs actual</h2>", predicted_vs_actual(outputs, targets, unit)]
    elif task == "forecast":
        sections += [
            "<h2>Predicted vs actual</h2>",
            predicted_vs_actual(outputs.ravel(), targets.ravel(), ""),
            example_forecasts(loaded, arrays["examples"], arrays["example_targets"]),
        ]
    if loaded.preprocessor.kind == "tabular" and loaded.preprocessor.selection:
        sections += ["<h2>Selected features</h2>", selection_section(loaded.preprocessor.selection)]
    if loaded.preprocessor.kind == "tabular" and loaded.preprocessor.pca:
        sections += ["<h2>Principal components</h2>", pca_section(loaded.preprocessor.pca)]
    if "samples.png" in files:
        sections += [
            "<h2>Samples</h2>",
            f"<img alt='samples' src='{data_uri(files['samples.png'])}'>",
        ]
    if "summary_inputs" in arrays:
        sections += ["<h2>SHAP summary</h2>", shap_summary(loaded, arrays["summary_inputs"])]
    examples = _examples_section(loaded, arrays)
    if examples:
        sections += ["<h2>Sample predictions and explanations</h2>", examples]
    return _page(ref, sections, files["MODEL_CARD.md"].decode())


def _page(ref: str, sections: list[str], card: str) -> str:
    """The report's page: its sections, then the model card."""
    sections = [*sections, "<h2>Model card</h2>", markdown.markdown(card, extensions=["tables"])]
    title = html.escape(f"forgeml run report: {ref}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"
    )


def policy_curves(history: list[dict], best_iteration: int) -> str:
    """The mean return and length of the training episodes over environment steps, the
    registered iteration marked; iterations in which no episode ended are left out."""
    scored = [r for r in history if r["episode_return_mean"] is not None]
    steps = [r["env_steps"] for r in scored]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot(steps, [r["episode_return_mean"] for r in scored], marker=".")
    axes[1].plot(steps, [r["episode_length_mean"] for r in scored], marker=".", color="grey")
    kept = next(r["env_steps"] for r in history if r["epoch"] == best_iteration)
    for ax, title in zip(axes, ("mean return", "mean episode length"), strict=True):
        ax.axvline(kept, color="green", linestyle=":", linewidth=1)
        ax.set_title(f"{title} of training episodes", fontsize=9)
        ax.set_xlabel("environment steps", fontsize=8)
    return _img(figure, "training curves")


def evaluation_returns(test: dict, random_policy: dict) -> str:
    """The returns of the held-out episodes: the policy's beside a random policy's."""
    figure, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.histogram_bin_edges([*test["returns"], *random_policy["returns"]], bins=30)
    ax.hist(random_policy["returns"], bins=bins, alpha=0.6, color="grey", label="random policy")
    ax.hist(test["returns"], bins=bins, alpha=0.7, color="#4c72b0", label="policy")
    ax.set(xlabel="episode return", ylabel="episodes", title="held-out episodes")
    ax.legend(fontsize=7)
    return _img(figure, "evaluation returns")


def policy_report(ref: str, cfg, metrics: dict, card: str) -> str:
    """The report page of a policy's package: its evaluation beside a random policy's,
    the training curves and the distribution of held-out returns."""
    run, test = metrics["run"], metrics["test"]
    sections = [
        f"<h1>{html.escape(ref)}</h1>",
        "<p>"
        + html.escape(
            f"{cfg.task.algorithm.name} policy for {cfg.env.name}; run {run['name']}, "
            f"{metrics['status']} after {len(metrics['history'])} iterations, registered "
            f"iteration {metrics['best_epoch']} (mean training return, max); "
            f"{run.get('wall_s', '?')} s; registered {metrics.get('registered_at', '?')}"
        )
        + "</p>",
        "<h2>Evaluation</h2>",
        _table(
            ["metric", "value"],
            [[name, f"{value:.5g}"] for name, value in scalar_metrics(test).items()],
        ),
        "<h2>Baseline</h2>",
        baseline_section(metrics["baseline"]),
        "<h2>Training curves</h2>",
        policy_curves(metrics["history"], metrics["best_epoch"]),
        "<h2>Evaluation returns</h2>",
        evaluation_returns(test, metrics["baseline"]["test"]),
    ]
    return _page(ref, sections, card)
