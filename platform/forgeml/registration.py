"""From a trained checkpoint to a registered model version: evaluate it on the test split
beside its baseline, draw and rate samples where the task draws images, write the model
package with its report, register it and log the registration. Training and tuning
both end here."""

from __future__ import annotations

from datetime import datetime, timezone

from forgeml.baselines import fit_baseline
from forgeml.config import ExperimentConfig
from forgeml.data.images import shape_text
from forgeml.data.pipeline import PreparedData
from forgeml.evaluate import evaluate
from forgeml.model_package import LoadedModel, PackageContents, load_model, package_files
from forgeml.models import build_model
from forgeml.monitor.drift import reference_statistics
from forgeml.report import (
    EVALUATION_FILE,
    EXAMPLES,
    REPORT_FILE,
    evaluation_arrays,
    read_arrays,
    run_report,
    shap_summary_rows,
)
from forgeml.storage import ModelRegistry, ModelVersion, Storage
from forgeml.tasks import build_task
from forgeml.tasks.generative import Judge, code_maps
from forgeml.tracking import log_registration


def load_judge(cfg: ExperimentConfig, storage: Storage, images) -> Judge | None:
    """The registered classifier that ``task.judge`` names, if any, checked to rate the
    ``images`` this experiment draws (their ``ImageFeatures``, or the fitted
    preprocessor): the same size and values. Called before training too, so a wrong
    judge fails the job early."""
    judge_cfg = getattr(cfg.task, "judge", None)
    if judge_cfg is None:
        return None
    try:
        loaded = load_model(ModelRegistry(storage), judge_cfg.model)
    except KeyError as exc:
        raise ValueError(f"task.judge.model: {exc.args[0]}; train the classifier first") from None
    reads = loaded.preprocessor
    if loaded.config.task.kind != "classification" or reads.describe()["kind"] != "image":
        raise ValueError(
            f"task.judge.model: {loaded.version.ref} is a {loaded.config.task.kind} model of "
            f"{reads.describe()['kind']} data; a judge classifies images"
        )
    if judge_cfg.no_defect_class not in loaded.task.class_names:
        raise ValueError(
            f"task.judge.no_defect_class: {judge_cfg.no_defect_class!r} is not a class of "
            f"{loaded.version.ref} ({', '.join(loaded.task.class_names)})"
        )
    shape, drawn = ((p.image_size, p.channels, p.max_value) for p in (reads, images))
    if shape != drawn:
        raise ValueError(
            f"task.judge.model: {loaded.version.ref} reads {shape_text(*shape[:2])} images "
            f"of values 0-{reads.max_value}; this experiment draws {shape_text(*drawn[:2])} "
            f"images of values 0-{images.max_value}"
        )
    return Judge(loaded.version.ref, judge_cfg, loaded.model, loaded.preprocessor, loaded.task)


def register_checkpoint(
    cfg: ExperimentConfig,
    storage: Storage,
    data: PreparedData,
    state: dict,
    status: str,
    history: list[dict],
    run: dict,
) -> tuple[ModelVersion, dict]:
    """Evaluate a checkpoint's model on the test split and register it as a package."""
    early = cfg.train.early_stopping
    task = build_task(cfg.task, data.target)
    model = build_model(cfg.model, data.preprocessor.model_inputs, task.num_outputs)
    model.load_state_dict(state["model"])
    evaluation = evaluate(model, task, data.test, data.preprocessor)
    baseline = fit_baseline(
        data.preprocessor,
        task,
        data.train,
        data.test,
        data.sizes["train"],
        evaluation.metrics,
        cfg.seed,
    )
    files = {}
    if cfg.task.draws_images:  # draw, show and rate new images
        judge = load_judge(cfg, storage, data.preprocessor)
        test_maps = code_maps(data.test.iter_batches(batch_size=1024, batch_format="numpy"))
        sampled, files = task.sample_report(model, test_maps, judge)
        evaluation.metrics |= sampled

    metrics = {
        "test": evaluation.metrics,
        **({"baseline": baseline} if baseline else {}),
        "best_epoch": state["epoch"],
        "selected_by": {"metric": early.metric, "mode": early.mode},
        "status": status,
        "history": history,
        "data": data.summary(cfg.task),
        "run": run,
        "registered_at": f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
    }
    summary_rows = shap_summary_rows(cfg, data)
    examples = data.test.take_batch(max(summary_rows, EXAMPLES), batch_format="numpy")
    files[EVALUATION_FILE] = evaluation_arrays(
        evaluation.predictions, evaluation.targets, examples, summary_rows
    )
    package = package_files(
        PackageContents(
            config=cfg,
            preprocessor=data.preprocessor,
            state_dict=state["model"],
            metrics=metrics,
            reference=reference_statistics(
                evaluation.inputs, task.drift_values(evaluation.predictions), cfg.seed
            ),
            files=files,
        )
    )
    model.eval()
    loaded = LoadedModel(None, cfg, data.preprocessor, model, task, metrics)
    package[REPORT_FILE] = run_report(
        f"{cfg.name} ({run['name']})", loaded, metrics, read_arrays(files[EVALUATION_FILE]), package
    ).encode()
    version = ModelRegistry(storage).register(cfg.name, package)
    log_registration(cfg, state.get("tracking"), version.ref, metrics, package)
    return version, metrics
