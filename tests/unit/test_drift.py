"""Drift tests without Ray: PSI, the false-alarm rate on unshifted traffic, alarms on
shifted traffic, the traffic recorder's files, the HTML report, and the retraining
RayJob built from a template."""

from __future__ import annotations

import time

import numpy as np
import pytest
import yaml
from forgeml.config import MonitorConfig, StorageConfig, TrafficConfig, config_from_dict
from forgeml.monitor.drift import (
    compare_categorical,
    drift_report,
    population_stability_index,
    reference_statistics,
)
from forgeml.monitor.report import drift_page
from forgeml.monitor.retrain import EXPERIMENT_KEY, rayjob_manifests
from forgeml.monitor.traffic import TrafficRecorder, read_traffic
from forgeml.storage import ModelVersion, Storage

from tests.conftest import tiny_raw_config

CLASSES = np.array(["none", "center", "edge-ring", "scratch"], dtype=object)
CLASS_SHARES = np.array([0.4, 0.2, 0.2, 0.2])


def _rows(rng: np.random.Generator, n: int, edge_ring: float = 0.2, dirt: float = 0.0):
    """Served rows like a wafer classifier's: a defect share per map (more for dirtier
    maps), the predicted class and its confidence."""
    shares = CLASS_SHARES * (1 - edge_ring) / (1 - CLASS_SHARES[2])
    shares[2] = edge_ring
    classes = CLASSES[rng.choice(len(CLASSES), n, p=shares)]
    inputs = {"defect_fraction": rng.beta(2, 18, n) + dirt}
    predictions = {"class": classes, "confidence": rng.beta(8, 1.5, n)}
    return inputs, predictions


def _traffic(inputs: dict, predictions: dict) -> dict:
    columns = {f"input.{k}": v for k, v in inputs.items()}
    columns |= {f"prediction.{k}": v for k, v in predictions.items()}
    columns["time"] = np.zeros(len(predictions["class"]))
    return columns


@pytest.fixture(scope="module")
def reference():
    return reference_statistics(*_rows(np.random.default_rng(0), 1500), seed=0)


def test_psi_matches_its_definition():
    reference, current = np.array([50, 30, 20]), np.array([30, 30, 40])
    r, c = reference / 100, current / 100
    assert population_stability_index(reference, current) == pytest.approx(
        np.sum((c - r) * np.log(c / r))
    )
    assert population_stability_index(reference, reference) == 0


def test_a_category_the_reference_never_saw_is_a_finite_shift():
    result = compare_categorical(
        {"kind": "categorical", "counts": {"a": 90, "b": 10}},
        np.array(["a"] * 50 + ["c"] * 50, dtype=object),
    )
    assert result["categories"] == ["a", "b", "c"]
    assert np.isfinite(result["psi"]) and result["psi"] > 1
    assert result["p_value"] < 1e-6


def test_unshifted_traffic_rarely_alarms(reference):
    """The false-alarm rate over 300 windows of 500 rows from the reference's
    distribution: the PSI threshold and the Bonferroni-corrected tests together keep it
    at the p-value's level or below."""
    rng = np.random.default_rng(1)
    settings = MonitorConfig()
    alarms = [
        drift_report(reference, _traffic(*_rows(rng, 500)), settings, "m:v1")["alarm"]
        for _ in range(300)
    ]
    assert np.mean(alarms) <= 0.01


@pytest.mark.parametrize(
    ("shift", "drifted"),
    [
        ({"edge_ring": 0.6}, "prediction.class"),  # more edge-ring defects
        ({"dirt": 0.08}, "input.defect_fraction"),  # dirtier maps: more failing dies
    ],
)
def test_shifted_traffic_alarms_and_names_what_moved(reference, shift, drifted):
    rng = np.random.default_rng(2)
    detected = [
        drift_report(reference, _traffic(*_rows(rng, 500, **shift)), MonitorConfig(), "m:v1")
        for _ in range(20)
    ]
    assert all(report["alarm"] and drifted in report["drifted"] for report in detected)
    assert detected[0]["values"][drifted]["psi"] >= 0.2


def test_a_small_but_significant_shift_is_not_an_alarm(reference):
    """5000 rows make a 2-point change in the class mix significant, but its PSI is far
    below what counts as a shift."""
    rng = np.random.default_rng(3)
    report = drift_report(
        reference, _traffic(*_rows(rng, 5000, edge_ring=0.22)), MonitorConfig(), "m:v1"
    )
    assert report["values"]["prediction.class"]["psi"] < 0.05
    assert not report["alarm"]


def test_too_little_traffic_gives_no_verdict(reference):
    rng = np.random.default_rng(4)
    report = drift_report(
        reference, _traffic(*_rows(rng, 50, edge_ring=0.9)), MonitorConfig(), "m:v1"
    )
    assert report["status"] == "insufficient_traffic" and not report["alarm"]


def test_the_html_report_holds_a_chart_per_value(reference):
    rng = np.random.default_rng(5)
    report = drift_report(
        reference, _traffic(*_rows(rng, 500, edge_ring=0.6)), MonitorConfig(), "m:v1"
    )
    page = drift_page(report)
    assert page.count("<img alt=") == 3 and page.count("data:image/png;base64,") == 3
    assert "Drift: DRIFT" in page and "http" not in page


def test_recorded_traffic_is_sampled_bounded_and_read_back_by_window(tmp_path):
    storage = Storage(StorageConfig(root=str(tmp_path)))
    version = ModelVersion("m", 1, str(tmp_path), str(tmp_path))
    settings = TrafficConfig(flush_interval_s=3600, max_buffer_rows=300, payloads=True)
    recorder = TrafficRecorder(storage, version, settings)
    inputs, predictions = _rows(np.random.default_rng(6), 200)
    started = time.time()
    recorder.record(inputs, predictions, [{"image": [i]} for i in range(200)])
    recorder.record(inputs, predictions)
    assert len(recorder.rows) == 300 and recorder.dropped == 100  # the oldest went
    recorder.close()

    traffic = read_traffic(storage, version, since=started - 1)
    assert len(traffic["time"]) == 300
    assert set(traffic) == {
        "time",
        "input.defect_fraction",
        "prediction.class",
        "prediction.confidence",
        "payload",
    }
    assert set(traffic["prediction.class"]) <= set(CLASSES)
    assert read_traffic(storage, version, since=time.time() + 10) == {}

    sampled = TrafficRecorder(
        storage, version, TrafficConfig(flush_interval_s=3600, sample_rate=0.25)
    )
    sampled.record(*_rows(np.random.default_rng(7), 4000))
    assert 800 < len(sampled.rows) < 1200
    sampled.stopped.set()


def test_files_past_retention_are_deleted(tmp_path):
    storage = Storage(StorageConfig(root=str(tmp_path)))
    version = ModelVersion("m", 1, str(tmp_path), str(tmp_path))
    recorder = TrafficRecorder(
        storage, version, TrafficConfig(flush_interval_s=3600, retention_hours=1)
    )
    old = int((time.time() - 7200) * 1000)
    stale = f"{recorder.folder}/{old}-{old + 1000}-dead.parquet"
    storage.write_bytes(stale, b"")
    recorder.record(*_rows(np.random.default_rng(8), 10))
    recorder.close()
    assert not storage.exists(stale)
    assert len(storage.list_files(recorder.folder, ".parquet")) == 1


def test_the_retraining_rayjob_is_the_template_with_its_own_name_and_experiment(tmp_path):
    cfg = config_from_dict(tiny_raw_config(tmp_path, data={"append": ["s3://b/new"]}))
    volume = {"name": "experiment", "configMap": {"name": "forge-forgeml-retrain"}}
    pod = {"spec": {"containers": [], "volumes": [volume, {"name": "tmp", "emptyDir": {}}]}}
    template = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": "forge-forgeml-retrain",
            "labels": {"app.kubernetes.io/instance": "forge"},
            "annotations": {"forgeml/experiment-configmap": "forge-forgeml-retrain"},
        },
        "spec": {
            "entrypoint": "python jobs/train.py --config /etc/forgeml/experiment.yaml",
            "rayClusterSpec": {
                "headGroupSpec": {"template": pod},
                "workerGroupSpecs": [{"template": pod}],
            },
            "submitterPodTemplate": pod,
        },
    }
    config_map, rayjob = rayjob_manifests(template, cfg, "tiny-wafer:v1")
    name = rayjob["metadata"]["name"]
    assert name.startswith("forge-forgeml-retrain-retrain-") and len(name) <= 63
    assert config_map["metadata"]["name"] == name
    assert yaml.safe_load(config_map["data"][EXPERIMENT_KEY])["data"]["append"] == ["s3://b/new"]
    assert rayjob["metadata"]["labels"]["forgeml/retrain-of"] == "tiny-wafer-v1"
    cluster = rayjob["spec"]["rayClusterSpec"]
    for pod_spec in (
        cluster["headGroupSpec"]["template"],
        cluster["workerGroupSpecs"][0]["template"],
        rayjob["spec"]["submitterPodTemplate"],
    ):
        assert pod_spec["spec"]["volumes"][0]["configMap"]["name"] == name
    assert template["spec"]["submitterPodTemplate"]["spec"]["volumes"][0]["configMap"]["name"] == (
        "forge-forgeml-retrain"
    )  # the template itself is untouched
    assert rayjob["spec"]["entrypoint"] == template["spec"]["entrypoint"]
