"""The Serve application over real HTTP on 127.0.0.1: predictions equal offline
evaluation, every bad input is a clear 4xx, and bearer-token auth is on unless turned off."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import hypothesis
import numpy as np
import pandas as pd
import pytest
import ray
import requests
import schemathesis
import torch
import yaml
from forgeml.cli import main
from forgeml.config import config_from_dict
from forgeml.data.wafer import CLASS_NAMES, generate_map
from forgeml.evaluate import evaluate
from forgeml.explain import explain
from forgeml.model_package import load_model
from forgeml.monitor.check import DriftGauges, check
from forgeml.monitor.traffic import read_traffic
from forgeml.runtime import RAY_ENV_DEFAULTS, free_port, shutdown
from forgeml.serve.apps import build_gateway, build_model_app
from forgeml.serve.deploy import AppArgs, _route_prefixes, deploy, undeploy
from forgeml.serve.schemas import PredictRequest
from forgeml.storage import ModelRegistry, Storage
from forgeml.train.trainer import run_training
from PIL import Image
from ray import serve
from ray.serve.schema import ServeDeploySchema

from tests.conftest import REPO, tiny_config, tiny_raw_config
from tests.e2e.drifted import drifted_maps
from tests.photos import coloured_shapes, photo_folder

TOKEN = "serve-test-token"
PREDICT = "/v1/models/tiny-wafer/predict"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny trained model behind two gateways, each with its own application of it: with
    auth at /, without auth at /open."""
    shutdown()  # the integration runtime, if this session started one
    metrics_port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_ENV_DEFAULTS.items():
            patch.setenv(name, value)  # as an embedded runtime of forgeml's starts with
        ray.init(
            address="local",
            # logical: the module's apps on two cores, a CPU for each replica: the two
            # gateways and their models (4), the models of other kinds and their
            # gateway (5), the version switch's two gateways and three versions at most
            # (5), and room for one test's own gateway and model
            num_cpus=16,
            include_dashboard=False,
            configure_logging=False,
            _metrics_export_port=metrics_port,
        )
    store = tmp_path_factory.mktemp("store")
    cfg = tiny_config(store)
    run_training(cfg)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FORGEML_SERVE_TOKEN", TOKEN)
        deploy(AppArgs(models=["tiny-wafer"], storage=cfg.storage), name="secured")
    open_args = AppArgs(models=["tiny-wafer:v1"], storage=cfg.storage, auth=False)
    deploy(open_args, name="open", route_prefix="/open")
    yield {
        "url": f"http://127.0.0.1:{port}",
        "cfg": cfg,
        "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
    }
    serve.shutdown()
    ray.shutdown()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _post(served, path, payload=None, token=TOKEN, data=None):
    headers = _bearer(token) if token else {}
    return requests.post(
        served["url"] + path,
        json=payload,
        data=data,
        headers=headers,
        timeout=60,
        allow_redirects=False,  # the predict path answers itself, no 307 to a slash
    )


def _maps(n: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([generate_map(i % len(CLASS_NAMES), 16, rng) for i in range(n)])


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_served_predictions_equal_offline_evaluation(served):
    maps = _maps(18)
    instances = [{"image": m.tolist()} for m in maps[:9]]
    instances += [{"image_base64": _png(m)} for m in maps[9:]]

    response = _post(served, PREDICT, {"instances": instances})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-wafer" and body["version"] == "v1"
    served_probs = np.array(
        [[p["probabilities"][c] for c in CLASS_NAMES] for p in body["predictions"]]
    )
    loaded = load_model(ModelRegistry(Storage(served["cfg"].storage)), "tiny-wafer:v1")
    inputs = loaded.preprocessor.transform({"image": maps})["inputs"]
    dataset = ray.data.from_items([{"inputs": x, "target": 0} for x in inputs])
    offline = evaluate(loaded.model, loaded.task, dataset, loaded.preprocessor)
    np.testing.assert_allclose(served_probs, offline.predictions, rtol=1e-4, atol=1e-6)
    labels = [CLASS_NAMES[i] for i in offline.predictions.argmax(1)]
    assert [p["label"] for p in body["predictions"]] == labels
    assert response.headers["X-Request-ID"]


def test_model_listing_health_and_readiness(served):
    models = requests.get(
        served["url"] + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ).json()
    assert [(m["name"], m["version"], m["input_shape"]) for m in models] == [
        ("tiny-wafer", "v1", [1, 16, 16])
    ]
    assert models[0]["classes"] == list(CLASS_NAMES)
    assert requests.get(served["url"] + "/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(served["url"] + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["models"] == ["tiny-wafer:v1"]
    schema = requests.get(served["url"] + "/openapi.json", timeout=30).json()
    assert "/v1/models/{name}/predict" in schema["paths"]


GOOD = {"image": np.ones((16, 16), dtype=int).tolist()}


def test_explain_answers_grad_cam_heatmaps(served):
    maps = _maps(3, seed=5)
    body = {"instances": [{"image": m.tolist()} for m in maps], "target": "edge-ring"}
    response = _post(served, "/v1/models/tiny-wafer/explain", body)
    assert response.status_code == 200, response.text
    explained = response.json()["explanations"]
    assert [row["explained"] for row in explained] == ["edge-ring"] * 3
    for row in explained:
        heatmap = np.array(row["heatmap"])
        assert heatmap.shape == (16, 16) and heatmap.sum() == pytest.approx(1, abs=1e-3)
        assert set(row["prediction"]) == {"label", "confidence", "probabilities"}
    versioned = _post(
        served, "/v1/models/tiny-wafer/versions/v1/explain", {"instances": body["instances"][:1]}
    )
    assert versioned.status_code == 200 and versioned.json()["version"] == "v1"
    wrong = _post(served, "/v1/models/tiny-wafer/explain", {**body, "target": "bump"})
    assert wrong.status_code == 422 and "'bump' is not a class" in wrong.json()["error"]["message"]
    many = _post(served, "/v1/models/tiny-wafer/explain", {"instances": body["instances"] * 6})
    assert many.status_code == 413 and "limit of 16" in many.json()["error"]["message"]


#: A model of its own for the drift test, whose retraining registers its v2.
DRIFTING = "drift-wafer"
DRIFT_PREDICT = f"/drift/v1/models/{DRIFTING}/predict"


def _serve_maps(served, maps: np.ndarray) -> None:
    for start in range(0, len(maps), 100):
        instances = [{"image": m.tolist()} for m in maps[start : start + 100]]
        response = _post(served, DRIFT_PREDICT, {"instances": instances}, token=None)
        assert response.status_code == 200, response.text


def _recorded_rows(storage: Storage, since: float, rows: int) -> None:
    version = ModelRegistry(storage).resolve(f"{DRIFTING}:v1")
    deadline = time.monotonic() + 60
    while len(read_traffic(storage, version, since).get("time", [])) < rows:
        assert time.monotonic() < deadline, "the replicas did not write the traffic they served"
        time.sleep(0.5)


def _check(storage: Storage, since: float, *overrides: str, gauges=None) -> dict:
    """A drift check of exactly the traffic recorded from ``since`` until now."""
    now = time.time()
    window = f"monitor.window_minutes={(now - since) / 60}"
    return check(storage, f"{DRIFTING}:v1", [window, *overrides], gauges, now=now)


def _copy_of_the_served_model(served, root: Path, name: str):
    """tiny-wafer:v1 registered again as ``name``:v1 under another storage root, for a
    test that must not change what the module's gateways serve."""
    source = ModelRegistry(Storage(served["cfg"].storage))
    version = source.resolve("tiny-wafer:v1")
    files = source.read_package(version)
    raw = yaml.safe_load(files["config.yaml"])
    raw["name"], raw["storage"]["root"] = name, str(root)
    cfg = config_from_dict(raw)
    files["config.yaml"] = cfg.to_yaml().encode()
    ModelRegistry(Storage(cfg.storage)).register(name, files)
    return cfg


def test_served_traffic_is_checked_for_drift_and_an_alarm_is_exported(served, tmp_path):
    """Maps like the training ones raise no alarm; edge-ring maps on a noisier line do,
    with an HTML report and a gauge on the metrics endpoint. What an alarm submits is
    tested on a cluster (tests/e2e/test_ray_job_submit.py)."""
    cfg = _copy_of_the_served_model(served, tmp_path / "store", DRIFTING)
    recording = AppArgs(
        models=[DRIFTING],
        storage=cfg.storage,
        auth=False,
        overrides=["serve.traffic.flush_interval_s=1"],  # so a check soon sees the traffic
    )
    deploy(recording, name="drift", route_prefix="/drift")
    storage = Storage(cfg.storage)
    started = time.time()
    _serve_maps(served, _maps(360, seed=11))
    _recorded_rows(storage, started, 360)
    report = _check(storage, started, "monitor.min_rows=300")
    assert report["status"] == "ok" and report["rows"] == 360, report["drifted"]

    shifted_at = time.time()
    _serve_maps(served, drifted_maps(360, seed=12))
    _recorded_rows(storage, shifted_at, 360)
    gauges = DriftGauges()  # kept alive while the endpoint is read
    report = _check(storage, shifted_at, gauges=gauges)
    assert report["alarm"], report["values"]
    # The inputs moved; whether a two-epoch model's answers moved enough to count varies
    # from run to run, so only that they were tested is asserted here (the unit tests
    # check that a shift of predicted classes alarms).
    assert "input.defect_fraction" in report["drifted"]
    assert {"prediction.class", "prediction.confidence"} <= set(report["values"])
    assert "retrain" not in report  # none configured
    assert report["report_uri"].endswith(".json")
    html = Path(report["report_uri"]).with_suffix(".html").read_text()
    assert "Drift: DRIFT" in html and html.count("data:image/png;base64,") == 3

    wanted = [
        "ray_forgeml_drift_alarm{",
        "ray_forgeml_drift_psi{",
    ]
    deadline = time.monotonic() + 60
    while True:
        lines = requests.get(served["metrics"], timeout=10).text.splitlines()
        alarm = [line for line in lines if line.startswith(wanted[0]) and DRIFTING in line]
        psi = [line for line in lines if line.startswith(wanted[1]) and "defect_fraction" in line]
        if alarm and psi:
            break
        assert time.monotonic() < deadline, "the drift gauges were not exported"
        time.sleep(2)
    assert float(alarm[0].rsplit(" ", 1)[1]) == 1.0
    assert float(psi[0].rsplit(" ", 1)[1]) >= 0.2
    undeploy("drift")


@pytest.fixture(scope="module")
def kinds(served, tmp_path_factory):
    """A table regressor, a text classifier, a colour-image classifier and a forecaster
    trained beside the wafer model and served together behind one gateway with auth at
    /kinds, as a user serves models of several kinds; deleted at the end, as `forgeml
    serve run` does on exit."""
    storage = served["cfg"].storage
    folder = tmp_path_factory.mktemp("kinds")
    _train_penguins_body_mass(storage)
    _train_reviews(storage, folder)
    _train_photos(storage, folder)
    _train_air_passengers(storage)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FORGEML_SERVE_TOKEN", TOKEN)
        deploy(AppArgs(models=list(KINDS), storage=storage), "kinds", "/kinds")
    yield storage
    undeploy("kinds")


#: The models of the ``kinds`` fixture.
KINDS = ("penguins-body-mass", "reviews", "photos", "air-passengers-lstm")


def _cli_train(example: Path, storage, *overrides: str) -> None:
    args = ["train", "--config", str(example), "--set", f"storage.root={storage.root}"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0


def _train_penguins_body_mass(storage) -> None:
    """Its model reads the principal components of the 8 best encoded columns."""
    _cli_train(
        REPO / "examples" / "penguins" / "body_mass.yaml",
        storage,
        "train.max_epochs=1",
        "data.features.select.top_k=8",
        "data.features.pca.components=0.95",
    )


def _train_air_passengers(storage) -> None:
    example = REPO / "examples" / "forecasting" / "air-passengers-lstm.yaml"
    _cli_train(example, storage, "train.max_epochs=1")


def test_a_table_model_serves_records_and_names_bad_fields(served, kinds):
    """Penguins body mass (regression) next to the wafer model: the same batching,
    typed records in, values out, bad fields named with a 422. Its model reads
    the principal components of the 8 best encoded columns, so serving applies the
    fitted selection and PCA as training did."""
    url = "/kinds/v1/models/penguins-body-mass/predict"
    records = [
        {
            "bill_length_mm": 47.5,
            "bill_depth_mm": 15,
            "flipper_length_mm": 217,
            "species": "Gentoo",
            "island": "Biscoe",
            "sex": "male",
        },
        {"bill_length_mm": None, "species": "Adelie"},  # missing values are imputed
    ]

    response = _post(served, url, {"instances": records})

    assert response.status_code == 200, response.text
    served_values = [p["value"] for p in response.json()["predictions"]]
    loaded = load_model(ModelRegistry(Storage(kinds)), "penguins-body-mass")
    inputs = loaded.preprocessor.transform(loaded.preprocessor.request_columns(records))["inputs"]
    with torch.no_grad():
        offline = loaded.task.predict(loaded.model(torch.from_numpy(inputs))).numpy()
    np.testing.assert_allclose(served_values, offline, rtol=1e-5)
    assert loaded.preprocessor.pca and len(loaded.preprocessor.describe()["selected"]) == 8
    # /explain answers each record's SHAP values, the same as explaining it offline.
    explained = _post(served, url.replace("/predict", "/explain"), {"instances": records})
    assert explained.status_code == 200, explained.text
    offline_explained = explain(loaded, loaded.preprocessor.request_columns(records))
    for row, offline_row in zip(explained.json()["explanations"], offline_explained, strict=True):
        assert row["method"] == "shap" and row["explained"] == "value"
        values = {a["feature"]: a["attribution"] for a in row["attributions"]}
        expected = {a["feature"]: a["attribution"] for a in offline_row["attributions"]}
        assert values == pytest.approx(expected, rel=1e-4, abs=1e-3)
    info = _listed(served, "penguins-body-mass")
    assert info["task"] == "regression" and info["classes"] == []
    assert info["inputs"]["categorical"]["species"] == ["Adelie", "Chinstrap", "Gentoo"]
    for bad, message in [
        ({"wings": 2}, "instances.0: unknown features ['wings']"),
        ({"bill_depth_mm": "deep"}, "instances.0.bill_depth_mm: expected a number, got 'deep'"),
        (GOOD, "instances.0: expected an object of feature values"),
    ]:
        refused = _post(served, url, {"instances": [bad]})
        assert refused.status_code == 422 and message in refused.json()["error"]["message"]


def _listed(served, name: str) -> dict:
    """What the kinds gateway's model list says of ``name``."""
    listing = requests.get(served["url"] + "/kinds/v1/models", headers=_bearer(TOKEN), timeout=30)
    assert listing.status_code == 200, listing.text
    (info,) = [m for m in listing.json() if m["name"] == name]
    return info


#: Short reviews whose class is carried by one word among words of neither class.
PRAISE, BLAME = ["superb", "wonderful", "delightful"], ["dreadful", "tedious", "awful"]
NEUTRAL = [
    "the",
    "film",
    "plot",
    "music",
    "cast",
    "was",
    "and",
    "its",
    "with",
    "story",
    "scenes",
    "ending",
    "actors",
]


def _reviews(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        words = list(rng.choice(NEUTRAL, 6))
        words.insert(int(rng.integers(0, 7)), str(rng.choice(PRAISE if i % 2 else BLAME)))
        rows.append({"text": " ".join(words), "opinion": "praise" if i % 2 else "blame"})
    return rows


def _train_reviews(storage, folder: Path) -> None:
    pd.DataFrame(_reviews(240)).to_csv(folder / "reviews.csv", index=False)
    raw = tiny_raw_config(storage.root, name="reviews")
    raw["model"] = {"kind": "bag_of_ngrams"}
    raw["data"] = {
        "source": {"kind": "table", "path": str(folder / "reviews.csv")},
        "features": {"kind": "text", "text": "text", "target": "opinion", "min_frequency": 1},
    }
    raw["train"]["max_epochs"] = 4
    run_training(config_from_dict(raw))


def test_a_text_model_serves_texts_and_explains_them_by_their_tokens(served, kinds):
    """A text classifier next to the wafer model, behind a token: texts in, the offline
    probabilities out; /explain answers each text's token SHAP values as explaining it
    offline does, led by the word that carries its class; the same auth and instance
    limit as the other routes."""
    url = "/kinds/v1/models/reviews/predict"
    records = [{"text": r["text"]} for r in _reviews(4, seed=9)]

    response = _post(served, url, {"instances": records})

    assert response.status_code == 200, response.text
    loaded = load_model(ModelRegistry(Storage(kinds)), "reviews")
    columns = loaded.preprocessor.request_columns(records)
    inputs = loaded.preprocessor.transform(columns)["inputs"]
    with torch.no_grad():
        offline = loaded.task.predict(loaded.model(torch.from_numpy(inputs))).numpy()
    for prediction, offline_row in zip(response.json()["predictions"], offline, strict=True):
        assert list(prediction["probabilities"].values()) == pytest.approx(offline_row, rel=1e-4)
    explain_url = url.replace("/predict", "/explain")
    explained = _post(served, explain_url, {"instances": records})
    assert explained.status_code == 200, explained.text
    rows = explained.json()["explanations"]
    for row, offline_row, record in zip(rows, explain(loaded, columns), records, strict=True):
        assert row["method"] == "shap" and row["explained"] == row["prediction"]["label"]
        values = {a["feature"]: a["attribution"] for a in row["attributions"]}
        expected = {a["feature"]: a["attribution"] for a in offline_row["attributions"]}
        assert values == pytest.approx(expected, rel=1e-4, abs=1e-5)
        leading = max(row["attributions"], key=lambda a: abs(a["attribution"]))
        assert leading["feature"].split(":", 1)[1] in set(PRAISE + BLAME) & set(
            record["text"].split()
        )
    assert _post(served, explain_url, {"instances": records}, token=None).status_code == 401
    many = _post(served, explain_url, {"instances": records * 5})
    assert many.status_code == 413 and "limit of 16" in many.json()["error"]["message"]
    refused = _post(served, url, {"instances": [{"text": 7}]})
    assert refused.status_code == 422, refused.text
    assert "instances.0.text" in refused.json()["error"]["message"]


def _encoded(image: np.ndarray, fmt: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=95)
    return base64.b64encode(buffer.getvalue()).decode()


def _train_photos(storage, folder: Path) -> None:
    raw = tiny_raw_config(storage.root, name="photos")
    raw["data"] = {
        "source": photo_folder(folder / "photos", per_class=20),
        "max_reject_fraction": 0.05,  # the folder's file that is not an image
    }
    raw["data"]["source"]["image_size"] = 24
    raw["train"]["max_epochs"] = 1
    run_training(config_from_dict(raw))


def test_a_colour_model_serves_rgb_arrays_png_and_jpeg_and_names_the_shape(served, kinds):
    """An RGB model next to the wafer model: rows of [R, G, B], PNG, RGBA PNG and JPEG
    files in, the offline predictions out; Grad-CAM over the picture; a picture of the
    wrong size refused with a 422 that names the shape it takes."""
    url = "/kinds/v1/models/photos/predict"
    pictures, _ = coloured_shapes(2, seed=5)
    instances = [
        {"image": pictures[0].tolist()},
        {"image_base64": _encoded(pictures[1], "PNG")},
        {"image_base64": _encoded(np.dstack([pictures[2], np.full((24, 24), 7, np.uint8)]), "PNG")},
        {"image_base64": _encoded(pictures[3], "JPEG")},
        {"image": pictures[4, ..., 0].tolist()},  # grey: repeated into R, G and B
    ]

    response = _post(served, url, {"instances": instances})

    assert response.status_code == 200, response.text
    served_probabilities = [p["probabilities"] for p in response.json()["predictions"]]
    loaded = load_model(ModelRegistry(Storage(kinds)), "photos")
    parsed = PredictRequest(instances=instances).instances
    inputs = loaded.preprocessor.transform(loaded.preprocessor.request_columns(parsed))["inputs"]
    with torch.no_grad():
        offline = loaded.task.predict(loaded.model(torch.from_numpy(inputs))).numpy()
    assert inputs.shape == (5, 3, 24, 24)
    for served_row, offline_row in zip(served_probabilities, offline, strict=True):
        assert list(served_row.values()) == pytest.approx(offline_row.tolist(), rel=1e-4)
    explained = _post(served, url.replace("/predict", "/explain"), {"instances": instances[:1]})
    assert explained.status_code == 200, explained.text
    (row,) = explained.json()["explanations"]
    assert row["method"] == "gradcam" and np.asarray(row["heatmap"]).shape == (24, 24)
    info = _listed(served, "photos")
    assert info["inputs"]["channels"] == 3 and info["inputs"]["height"] == 24
    small = {"image": pictures[5, :16, :16].tolist()}
    refused = _post(served, url, {"instances": [instances[0], small]})
    assert refused.status_code == 422
    assert (
        "instances.1: expected a 24x24x3 image, got 16x16x3" in refused.json()["error"]["message"]
    )


def test_a_forecaster_serves_histories_and_names_bad_ones(served, kinds):
    """AirPassengers (a forecast of 12 months from 24) next to the wafer model: histories
    with gaps in, one value per horizon step out, a wrong length refused with a 422."""
    name = "air-passengers-lstm"
    url = f"/kinds/v1/models/{name}/predict"
    histories = [[float(300 + 5 * i) for i in range(24)], [None] + [400.0] * 23]

    response = _post(served, url, {"instances": [{"history": h} for h in histories]})

    assert response.status_code == 200, response.text
    served_forecasts = [p["forecast"] for p in response.json()["predictions"]]
    loaded = load_model(ModelRegistry(Storage(kinds)), name)
    columns = loaded.preprocessor.request_columns([{"history": h} for h in histories])
    inputs = torch.from_numpy(loaded.preprocessor.transform(columns)["inputs"])
    with torch.no_grad():
        offline = loaded.task.predict(loaded.model(inputs)).numpy()
    np.testing.assert_allclose(served_forecasts, offline, rtol=1e-5)
    info = _listed(served, name)
    assert info["task"] == "forecast" and info["inputs"]["window"] == 24
    for bad, message in [
        ({"history": [1.0] * 5}, "instances.0.history: expected a list of the last 24 values"),
        ({"history": [None] * 24}, "instances.0.history: no observed value"),
        (
            {"history": [1.0] * 24, "extra": 1},
            "instances.0.features.history.float: Input should",
        ),
    ]:
        refused = _post(served, url, {"instances": [bad]})
        assert refused.status_code == 422 and message in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "payload", "data", "status", "message"),
    [
        (
            PREDICT,
            {"instances": [{"image": [[1] * 8] * 8}]},
            None,
            422,
            "expected a 16x16 image, got 8x8",
        ),
        (
            PREDICT,
            {"instances": [{"image": [[1] * 16] * 15 + [[1] * 3]}]},
            None,
            422,
            "rows have different lengths",
        ),
        (PREDICT, {"instances": [{"image": [["x"] * 16] * 16}]}, None, 422, "valid integer"),
        (
            PREDICT,
            {"instances": [{"image": [[7] * 16] * 16}]},
            None,
            422,
            "instances.0: values must be 0 to 2",
        ),
        (PREDICT, None, '{"instances": [{"image": [[NaN]]}]}', 422, "finite number"),
        (PREDICT, None, '{"instances": [{"image": [[Infinity]]}]}', 422, "finite number"),
        (PREDICT, {"instances": []}, None, 422, "at least 1 item"),
        (PREDICT, {"instances": [{}]}, None, 422, "exactly one of 'image' or 'image_base64'"),
        (PREDICT, {"instances": [{"image_base64": "%%%"}]}, None, 422, "not valid base64"),
        (PREDICT, {"instances": [{"image_base64": "aGVsbG8="}]}, None, 422, "readable PNG or JPEG"),
        (PREDICT, {"rows": []}, None, 422, "Extra inputs are not permitted"),
        (PREDICT, None, "{not json", 422, "not valid JSON"),
        (PREDICT, {"instances": [GOOD] * 300}, None, 413, "exceed the limit of 256"),
        (PREDICT, None, "x" * 4_100_000, 413, "request body exceeds"),
        (
            "/v1/models/nope/predict",
            {"instances": [GOOD]},
            None,
            404,
            "no served model named 'nope'",
        ),
        (
            "/v1/models/tiny-wafer/versions/v7/predict",
            {"instances": [GOOD]},
            None,
            404,
            "'tiny-wafer:v7' is not served",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(served, path, payload, data, status, message):
    headers = {"Content-Type": "application/json"} if data else None
    response = requests.post(
        served["url"] + path,
        json=payload,
        data=data,
        headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})},
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["code"] == status
    assert response.headers["X-Request-ID"] == error["request_id"]
    assert "Traceback" not in response.text
    # the replica survived: a good request still works
    assert _post(served, PREDICT, {"instances": [GOOD]}).status_code == 200


@pytest.mark.parametrize(("token", "message"), [(None, "missing"), ("nope", "invalid")])
def test_requests_without_the_token_get_401(served, token, message):
    response = _post(served, PREDICT, {"instances": [GOOD]}, token=token)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert message in response.json()["error"]["message"]
    listing = requests.get(served["url"] + "/v1/models", timeout=30)
    assert listing.status_code == 401


TEAM_A, OPERATIONS = "team-a-serve-token-0123", "operations-serve-token-0123"


def test_scoped_tokens_reach_only_their_models_and_actions(served, tmp_path, monkeypatch):
    """A token file: team A's token may predict with team A's model only; the
    operations token may list and explain team B's; each is refused elsewhere (403)."""
    for name in ("team-a-wafer", "team-b-wafer"):
        cfg = _copy_of_the_served_model(served, tmp_path / "store", name)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"token": TEAM_A, "models": ["team-a-*"], "actions": ["predict"]},
                    {"token": OPERATIONS, "models": ["team-b-*"], "actions": ["list", "explain"]},
                ]
            }
        )
    )
    monkeypatch.delenv("FORGEML_SERVE_TOKEN", raising=False)
    monkeypatch.setenv("FORGEML_SERVE_TOKEN_FILE", str(tokens))
    body = {"instances": [GOOD]}
    deploy(AppArgs(models=["team-a-wafer", "team-b-wafer"], storage=cfg.storage), "teams", "/teams")
    try:
        url = "/teams/v1/models"
        assert _post(served, f"{url}/team-a-wafer/predict", body, TEAM_A).status_code == 200
        refused = _post(served, f"{url}/team-b-wafer/predict", body, TEAM_A)
        assert refused.status_code == 403
        assert "this token may not predict model 'team-b-wafer'" in refused.text
        assert _post(served, f"{url}/team-a-wafer/explain", body, TEAM_A).status_code == 403
        listing = requests.get(served["url"] + url, headers=_bearer(TEAM_A), timeout=30)
        assert listing.status_code == 403
        listing = requests.get(served["url"] + url, headers=_bearer(OPERATIONS), timeout=30)
        assert [m["name"] for m in listing.json()] == ["team-b-wafer"]
        assert _post(served, f"{url}/team-b-wafer/explain", body, OPERATIONS).status_code == 200
        assert _post(served, f"{url}/team-b-wafer/predict", body, OPERATIONS).status_code == 403
        assert _post(served, f"{url}/team-a-wafer/predict", body, TOKEN).status_code == 401
    finally:
        undeploy("teams")


def test_auth_can_be_turned_off_explicitly(served):
    response = _post(served, "/open" + PREDICT, {"instances": [GOOD]}, token=None)
    assert response.status_code == 200, response.text


def test_serving_without_a_token_configured_refuses_to_start(served, monkeypatch, capsys):
    monkeypatch.delenv("FORGEML_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("FORGEML_SERVE_TOKEN_FILE", raising=False)
    root = served["cfg"].storage.root
    assert main(["serve", "run", "--model", "tiny-wafer", "--storage-root", root]) == 2
    assert "serving needs a bearer token" in capsys.readouterr().err


def test_serve_build_pins_versions_for_serve_deploy(served, capsys, monkeypatch):
    root = served["cfg"].storage.root
    monkeypatch.setenv("FORGEML_SERVE_TOKEN", TOKEN)
    assert main(["serve", "build", "--model", "tiny-wafer", "--storage-root", root]) == 0
    written = capsys.readouterr().out
    assert TOKEN not in written  # the cluster reads it from its own environment
    config = yaml.safe_load(written)
    ServeDeploySchema.model_validate(config)
    apps = {app["name"]: app for app in config["applications"]}
    assert set(apps) == {"forgeml.tiny-wafer-v1", "forgeml"}
    model = apps["forgeml.tiny-wafer-v1"]
    assert model["route_prefix"] == "/v1/models/tiny-wafer/predict"  # no gateway hop
    assert model["args"]["model"] == "tiny-wafer:v1" and model["args"]["auth"] is True
    assert model["args"]["storage"]["root"] == root
    gateway = apps["forgeml"]
    assert gateway["route_prefix"] == "/" and gateway["args"]["auth"] is True
    (routes,) = [d["user_config"]["routes"] for d in gateway["deployments"]]
    assert [(r["app"], r["info"]["version"]) for r in routes] == [("forgeml.tiny-wafer-v1", "v1")]
    # the import paths build applications from exactly these arguments
    for app in config["applications"]:
        module, _, builder = app["import_path"].partition(":")
        assert module == "forgeml.serve.apps"
        assert isinstance(
            {"build_model_app": build_model_app, "build_gateway": build_gateway}[builder](
                app["args"]
            ),
            serve.Application,
        )


def test_prometheus_metrics_count_requests_by_code_model_and_version(served):
    assert _post(served, PREDICT, {"instances": [GOOD, GOOD]}).status_code == 200
    assert _post(served, PREDICT, {"instances": []}).status_code == 422
    wanted = {
        "ray_forgeml_requests_total": ['code="200"', 'model="tiny-wafer"', 'version="v1"'],
        "ray_forgeml_request_latency_s_bucket": ['route="/v1/models/{name}/predict"'],
        "ray_forgeml_batch_maps_bucket": ['model="tiny-wafer"'],
    }
    deadline = time.monotonic() + 60
    while True:
        text = requests.get(served["metrics"], timeout=10).text
        lines = text.splitlines()
        found = {
            name: any(line.startswith(name) and all(t in line for t in tags) for line in lines)
            for name, tags in wanted.items()
        }
        errors = [
            line
            for line in lines
            if line.startswith("ray_forgeml_requests_total") and 'code="422"' in line
        ]
        if all(found.values()) and errors:
            break
        assert time.monotonic() < deadline, f"metrics missing: {found}, 422 seen: {bool(errors)}"
        time.sleep(2)


def test_access_logs_are_json_lines_with_the_request_id(served):
    request_id = f"access-log-{time.time_ns()}"
    response = requests.post(
        served["url"] + PREDICT,
        json={"instances": [GOOD]},
        headers={"Authorization": f"Bearer {TOKEN}", "X-Request-ID": request_id},
        timeout=60,
    )
    assert response.headers["X-Request-ID"] == request_id
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 30
    while True:
        records = [
            json.loads(line)
            for path in logs.glob("replica_secured.tiny-wafer-v1_ModelServer_*.log")
            for line in path.read_text().splitlines()
            if request_id in line
        ]
        # The replica's other lines for the request may come first: wait for its access line.
        if any("200" in r["message"] and "/predict" in r["message"] for r in records):
            break
        assert time.monotonic() < deadline, f"no access log line with the request id: {records}"
        time.sleep(1)
    assert all(r["request_id"] == request_id for r in records)


def test_schema_fuzz_never_gets_a_server_error(served):
    """Requests generated from the served OpenAPI schema, for every route, with the token."""
    schema = schemathesis.openapi.from_url(served["url"] + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    seen: list[tuple[str, int]] = []

    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=20,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def call(case):
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            seen.append((case.path, response.status_code))
            assert response.status_code < 500, (case.path, case.body, response.text[:500])

        call()
    assert {code for _, code in seen} & {200, 422}


#: A model of its own for the bounded queue, whose settings must not reach the others.
BOUNDED = "bounded-wafer"


def test_past_the_queue_bound_clients_get_503_with_retry_after_never_a_hang(served, tmp_path):
    """One replica taking one request at a time, each waiting 0.2 s for a batch, and a
    queue of two: a burst of 24 at once gets answers or 503s with Retry-After, all within
    seconds, and the model serves again once the burst is over."""
    cfg = _copy_of_the_served_model(served, tmp_path / "store", BOUNDED)
    settings = {
        "max_ongoing_requests": 1,
        "max_queued_requests": 2,
        "retry_after_s": 2,
        "max_batch_size": 2,
        "batch_wait_timeout_s": 0.2,
        "autoscaling.max_replicas": 1,
    }
    bounded = AppArgs(
        models=[BOUNDED],
        storage=cfg.storage,
        auth=False,
        overrides=[f"serve.{k}={v}" for k, v in settings.items()],
    )
    deploy(bounded, name="bounded", route_prefix="/bounded")
    url = f"{served['url']}/bounded/v1/models/{BOUNDED}/predict"
    answers: list[requests.Response] = []

    def call():
        answers.append(requests.post(url, json={"instances": [GOOD]}, timeout=30))

    started = time.monotonic()
    burst = [threading.Thread(target=call) for _ in range(24)]
    for thread in burst:
        thread.start()
    for thread in burst:
        thread.join()

    assert time.monotonic() - started < 20
    codes = [answer.status_code for answer in answers]
    assert set(codes) == {200, 503}, codes
    for refused in (a for a in answers if a.status_code == 503):
        assert refused.headers["Retry-After"] == "2"
        # Serve's ingress refuses these itself (the predict path reaches the model's
        # deployment straight), with its own text body.
        assert "max_queued_requests" in refused.text, refused.text
    assert requests.post(url, json={"instances": [GOOD]}, timeout=30).status_code == 200
    undeploy("bounded")


#: A model of its own for the version switch, so that tiny-wafer stays at v1 for the
#: other tests whichever order they run in.
SWITCHING = "switch-wafer"


def test_switching_to_a_new_version_under_load_fails_no_request(served, monkeypatch, tmp_path):
    """Two gateways, one with auth and one without, move from v1 to a newly registered v2
    while clients keep calling the model's predict path, which each gateway's newest
    version answers itself; a gateway's v1 application is deleted once it has moved."""
    storage = _copy_of_the_served_model(served, tmp_path / "store", SWITCHING).storage
    monkeypatch.setenv("FORGEML_SERVE_TOKEN", TOKEN)
    prefixes = {"secured": "/switch-secured", "open": "/switch-open"}

    def serve_latest(gateway: str, ref: str = SWITCHING) -> None:
        args = AppArgs(models=[ref], storage=storage, auth=gateway == "secured")
        deploy(args, name=f"switch-{gateway}", route_prefix=prefixes[gateway])

    for gateway in prefixes:
        serve_latest(gateway, f"{SWITCHING}:v1")
    registry = ModelRegistry(Storage(storage))
    v1 = registry.resolve(f"{SWITCHING}:v1")
    assert registry.register(SWITCHING, registry.read_package(v1)).version == 2
    predict = f"/v1/models/{SWITCHING}/predict"
    urls = {gateway: served["url"] + prefix + predict for gateway, prefix in prefixes.items()}
    stop = threading.Event()
    seen: dict[str, list[tuple[int, str]]] = {gateway: [] for gateway in urls}

    def load(gateway):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with requests.Session() as session:
            while not stop.is_set():
                response = session.post(
                    urls[gateway], json={"instances": [GOOD]}, headers=headers, timeout=60
                )
                seen[gateway].append((response.status_code, response.json().get("version")))

    clients = [threading.Thread(target=load, args=(g,)) for g in urls for _ in range(2)]
    for client in clients:
        client.start()
    try:
        time.sleep(1)
        serve_latest("secured")
        assert f"switch-secured.{SWITCHING}-v1" not in serve.status().applications
        assert f"switch-open.{SWITCHING}-v1" in serve.status().applications  # not moved yet
        serve_latest("open")
        time.sleep(1)
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert not [app for app in serve.status().applications if app.endswith(f"{SWITCHING}-v1")]
    held = _route_prefixes()
    for gateway, prefix in prefixes.items():
        assert held[f"switch-{gateway}.{SWITCHING}-v2"] == prefix + predict
    for gateway, results in seen.items():
        assert [r for r in results if r[0] != 200] == [], gateway
        assert len(results) > 50 and results[0][1] == "v1" and results[-1][1] == "v2", gateway
    for gateway in prefixes:
        undeploy(f"switch-{gateway}")
