"""One drift check of a served model version: read its reference and a window of its
recorded traffic, test, write the report, export the gauges, and retrain on an alarm.

What ``jobs/monitor.py`` and ``forgeml monitor`` run, once or every ``--interval``
seconds. The report goes to ``<storage>/monitoring/<name>/v<N>/reports/<time>.json``
and ``.html``; a retraining is started at most once per version (the record of it is
``retrain.json`` beside the reports).
"""

from __future__ import annotations

import json
import logging
import time

from forgeml.config import ExperimentConfig
from forgeml.model_package import package_config
from forgeml.monitor.drift import REFERENCE_FORMAT, drift_report
from forgeml.monitor.report import drift_page
from forgeml.monitor.retrain import retrain_config, submit_ray_job, submit_rayjob
from forgeml.monitor.traffic import monitoring_parts, read_traffic
from forgeml.storage import ModelRegistry, ModelVersion, Storage

logger = logging.getLogger(__name__)

RETRAIN_RECORD = "retrain.json"


class DriftGauges:
    """Prometheus gauges through Ray's metrics agent (names get the ``ray_`` prefix):
    each tested value's PSI, and whether the version is in alarm."""

    def __init__(self):
        from ray.util import metrics

        self.psi = metrics.Gauge(
            "forgeml_drift_psi",
            description="Population stability index of a served value against the reference.",
            tag_keys=("model", "version", "value"),
        )
        self.alarm = metrics.Gauge(
            "forgeml_drift_alarm",
            description="1 when a served model version's traffic has drifted, else 0.",
            tag_keys=("model", "version"),
        )

    def set(self, version: ModelVersion, report: dict) -> None:
        tags = {"model": version.name, "version": f"v{version.version}"}
        for value, result in report["values"].items():
            self.psi.set(result["psi"], tags={**tags, "value": value})
        self.alarm.set(float(report["alarm"]), tags=tags)


def check(
    storage: Storage,
    ref: str,
    overrides: list[str] | None = None,
    gauges: DriftGauges | None = None,
    now: float | None = None,
) -> dict:
    """Check ``ref``'s recorded traffic of the last ``monitor.window_minutes``."""
    registry = ModelRegistry(storage)
    version = registry.resolve(ref)
    cfg: ExperimentConfig = package_config(registry, version, overrides or [])
    reference = json.loads(registry.read(version, "reference.json"))
    if reference.get("format") != REFERENCE_FORMAT:
        raise ValueError(
            f"{version.ref} was registered before drift monitoring (reference.json has no "
            "samples to test against); train it again"
        )
    now = now or time.time()
    since = now - cfg.monitor.window_minutes * 60
    traffic = read_traffic(storage, version, since, now)
    report = drift_report(reference, traffic, cfg.monitor, version.ref)
    report["window"] = {"from": since, "to": now}
    if report["alarm"] and cfg.monitor.retrain is not None:
        report["retrain"] = _retrain(storage, registry, version, cfg, report)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    reports = monitoring_parts(version, "reports")
    report["report_uri"] = storage.uri(*reports, f"{stamp}.json")
    storage.write_text(storage.path(*reports, f"{stamp}.json"), json.dumps(report, indent=2))
    storage.write_text(storage.path(*reports, f"{stamp}.html"), drift_page(report))
    if gauges is not None:
        gauges.set(version, report)
    logger.info(
        "%s: %s over %d rows (max PSI %s); drifted: %s",
        version.ref,
        report["status"],
        report["rows"],
        report.get("max_psi"),
        ", ".join(report["drifted"]) or "nothing",
    )
    return report


def _retrain(storage, registry, version, cfg: ExperimentConfig, report: dict) -> dict:
    """Start the retraining unless one was started for this version already."""
    record_path = storage.path(*monitoring_parts(version, RETRAIN_RECORD))
    if storage.exists(record_path):
        return {"skipped": "already started", **json.loads(storage.read_text(record_path))}
    settings = cfg.monitor.retrain
    experiment = retrain_config(registry, version, settings.append)
    if settings.submit_to == "ray":
        submitted = submit_ray_job(experiment, settings.ray_address, version.ref)
    else:
        submitted = submit_rayjob(experiment, settings, version.ref)
    record = {
        "submitted_to": settings.submit_to,
        "job": submitted,
        "append": experiment.data.append,
        "at": report["checked_at"],
        "drifted": report["drifted"],
    }
    storage.write_text(record_path, json.dumps(record, indent=2))
    logger.info(
        "%s drifted; started retraining %s (%s)", version.ref, submitted, settings.submit_to
    )
    return record
