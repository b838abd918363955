import asyncio
import base64
import io
import re
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from fastapi.security import HTTPAuthorizationCredentials
from forgeml.config import AutoscalingConfig
from forgeml.data.images import ImagePreprocessor
from forgeml.serve import gateway
from forgeml.serve.auth import TOKEN_ENV, TOKEN_FILE_ENV, Access, read_access
from forgeml.serve.deploy import AppArgs, _direct_routes, plan, predict_path
from forgeml.serve.schemas import ImageInstance
from PIL import Image
from starlette.exceptions import HTTPException


def _encoded(array: np.ndarray, mode: str = "L", fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_array_and_png_instances_decode_to_the_same_map():
    wafer = np.random.default_rng(0).integers(0, 3, (8, 8)).astype(np.uint8)
    from_array = ImageInstance(image=wafer.tolist()).to_array(1)
    from_png = ImageInstance(image_base64=_encoded(wafer)).to_array(1)
    from_rgb_png = ImageInstance(image_base64=_encoded(wafer, "RGB")).to_array(1)
    for decoded in (from_array, from_png, from_rgb_png):
        np.testing.assert_array_equal(decoded, wafer[..., None])


def test_colour_instances_decode_as_rgb_and_grey_as_pil_converts_them():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    np.testing.assert_array_equal(ImageInstance(image=photo.tolist()).to_array(3), photo)
    np.testing.assert_array_equal(
        ImageInstance(image_base64=_encoded(photo, "RGB")).to_array(3), photo
    )
    with_alpha = np.concatenate([photo, np.full((8, 8, 1), 9, np.uint8)], -1)
    np.testing.assert_array_equal(
        ImageInstance(image_base64=_encoded(with_alpha, "RGBA")).to_array(3), photo
    )
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    np.testing.assert_array_equal(ImageInstance(image=photo.tolist()).to_array(1)[..., 0], grey)
    np.testing.assert_array_equal(
        ImageInstance(image=grey.tolist()).to_array(3), np.repeat(grey[..., None], 3, -1)
    )
    jpeg = ImageInstance(image_base64=_encoded(photo, "RGB", "JPEG")).to_array(3)
    assert jpeg.shape == (8, 8, 3) and jpeg.dtype == np.uint8


@pytest.mark.parametrize(
    ("instance", "message"),
    [
        ({"image": [[[1, 2]] * 4] * 4}, "'image' pixels hold 2 values, not 1 or 3"),
        ({"image": [[1, 2], [3]]}, "'image' rows have different lengths"),
        ({"image_base64": "not base64!"}, "'image_base64' is not valid base64"),
        ({"image_base64": base64.b64encode(b"GIF89a").decode()}, "readable PNG or JPEG"),
    ],
)
def test_unusable_image_instances_say_why(instance, message):
    with pytest.raises(ValueError, match=message):
        ImageInstance(**instance).to_array(3)


def test_a_bmp_file_is_refused_by_format():
    bmp = _encoded(np.zeros((4, 4), np.uint8), fmt="BMP")
    with pytest.raises(ValueError, match="'image_base64' holds BMP, not PNG or JPEG"):
        ImageInstance(image_base64=bmp).to_array(1)


def test_a_colour_model_names_the_shape_it_takes():
    photo = ImagePreprocessor(
        image_size=4, mean=(1.0,) * 3, std=(1.0,) * 3, class_names=("a", "b"), max_value=255
    )
    photo = replace(photo, channels=3)
    small = ImageInstance(image=np.zeros((2, 2, 3), np.uint8).tolist())
    with pytest.raises(ValueError, match="instances.0: expected a 4x4x3 image, got 2x2x3"):
        photo.request_columns([small])
    grey = ImageInstance(image=np.full((4, 4), 7, np.uint8).tolist())
    assert photo.request_columns([grey])["image"].shape == (1, 4, 4, 3)


def test_a_wafer_model_refuses_values_above_its_die_codes_and_a_picture_model_takes_them():
    bright = ImageInstance(image_base64=_encoded(np.full((4, 4), 200, np.uint8)))
    wafer = ImagePreprocessor(image_size=4, mean=(1.0,), std=(0.5,), class_names=("a", "b"))
    with pytest.raises(ValueError, match="instances.0: values must be 0 to 2"):
        wafer.request_columns([bright])
    picture = ImagePreprocessor(
        image_size=4, mean=(100.0,), std=(50.0,), class_names=("a", "b"), max_value=255
    )
    assert picture.request_columns([bright])["image"].max() == 200


def _bearer(token: str) -> HTTPAuthorizationCredentials:
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)


def _status(access: Access, token: str | None, action: str, model: str | None) -> int:
    try:
        access.check(None if token is None else _bearer(token), action, model)
    except HTTPException as exc:
        return exc.status_code
    return 200


ONE = "from-env-0123456789"


def test_one_token_from_environment_or_file_may_do_everything(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    assert read_access(auth=False) is None
    with pytest.raises(ValueError, match="--no-auth"):
        read_access(auth=True)
    secret = tmp_path / "token"
    secret.write_text("from-file-0123456789\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="absent, which is not a file"):
        read_access(auth=True)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(secret))
    from_file = read_access(auth=True)
    assert _status(from_file, "from-file-0123456789", "explain", "any-model") == 200
    monkeypatch.setenv(TOKEN_ENV, ONE)
    access = read_access(auth=True)
    assert [_status(access, ONE, action, "m") for action in ("predict", "act", "list")] == [200] * 3
    assert _status(access, "from-file-0123456789", "predict", "m") == 401
    assert _status(access, None, "predict", "m") == 401
    assert access.fingerprint != from_file.fingerprint


TEAM_A, OPERATIONS = "team-a-token-0123456789", "operations-token-0123456789"
SCOPED = f"""
tokens:
  - token: {TEAM_A}
    models: ["team-a-*"]
    actions: [predict]
  - token: {OPERATIONS}
    models: ["*"]
    actions: [predict, explain, list]
"""


def test_scoped_tokens_reach_their_models_and_actions_only(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    secret = tmp_path / "tokens.yaml"
    secret.write_text(SCOPED)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(secret))

    access = read_access(auth=True)

    assert _status(access, TEAM_A, "predict", "team-a-churn") == 200
    assert _status(access, TEAM_A, "predict", "team-b-churn") == 403
    assert _status(access, TEAM_A, "explain", "team-a-churn") == 403
    assert _status(access, TEAM_A, "list", None) == 403
    assert _status(access, OPERATIONS, "explain", "team-b-churn") == 200
    assert _status(access, OPERATIONS, "act", "cartpole") == 403
    assert _status(access, "team-a-token-012345678X", "predict", "team-a-churn") == 401
    with pytest.raises(HTTPException, match="this token may not predict model 'team-b-churn'"):
        access.check(_bearer(TEAM_A), "predict", "team-b-churn")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tokens: []", "tokens: List should have at least 1 item"),
        ("tokens:\n  - {token: short, models: ['*'], actions: [predict]}", "tokens.0.token"),
        (
            f"tokens:\n  - {{token: {ONE}, models: ['*'], actions: [delete]}}",
            "tokens.0.actions.0: Input should be 'predict', 'explain', 'act' or 'list'",
        ),
        (f"tokens:\n  - {{token: {ONE}, actions: [predict]}}", "tokens.0.models: Field required"),
        (
            f"tokens:\n  - {{token: {ONE}, models: ['*'], actions: [list]}}\n"
            f"  - {{token: {ONE}, models: ['x'], actions: [predict]}}",
            "a token is listed twice",
        ),
        ("", "is empty"),
    ],
)
def test_a_bad_token_file_is_named_with_its_problem(monkeypatch, tmp_path, text, message):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    secret = tmp_path / "tokens.yaml"
    secret.write_text(text)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(secret))
    with pytest.raises(ValueError, match=f"FORGEML_SERVE_TOKEN_FILE: .*{re.escape(message)}"):
        read_access(auth=True)


def test_autoscaling_bounds_are_checked():
    with pytest.raises(ValueError, match="min_replicas \\(3\\) must be <= max_replicas \\(2\\)"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)


class ReadinessCalls:
    """A deployment handle's ``ready`` calls, each answering as ``answers`` says in turn:
    "hang" (a replica whose node is gone, not yet known to be), "ok" or "fail"."""

    def __init__(self, *answers: str):
        self.answers, self.started, self.cancelled = list(answers), 0, 0

    @property
    def ready(self):
        return self

    def remote(self):
        answer = self.answers[min(self.started, len(self.answers) - 1)]
        self.started += 1
        return self._answer(answer)

    async def _answer(self, answer: str) -> str:
        if answer == "fail":
            raise RuntimeError("the replica failed")
        if answer == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return "model:v1"


def test_readiness_is_asked_again_beside_a_call_stuck_on_a_lost_replica(monkeypatch):
    monkeypatch.setattr(gateway, "READY_HEDGE_S", 0.05)
    handle = ReadinessCalls("hang", "hang", "ok")

    asyncio.run(asyncio.wait_for(gateway._a_replica_answers(handle), 5))

    assert handle.started == 3 and handle.cancelled == 2  # the stuck calls are withdrawn


def test_readiness_fails_when_a_replica_fails_and_times_out_when_all_hang(monkeypatch):
    monkeypatch.setattr(gateway, "READY_HEDGE_S", 0.05)
    with pytest.raises(RuntimeError, match="the replica failed"):
        asyncio.run(gateway._a_replica_answers(ReadinessCalls("hang", "fail")))
    hanging = ReadinessCalls("hang")
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(gateway._a_replica_answers(hanging), 0.3))
    assert hanging.cancelled == hanging.started > 1


def test_readiness_takes_a_recent_answer_and_probes_a_version_that_gave_none(monkeypatch):
    monkeypatch.setattr(gateway, "READY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(gateway, "READY_HEDGE_S", 0.05)
    unwrapped = gateway.Gateway.func_or_class.__mro__[1]  # the class under Serve's ASGI wrapper
    server = unwrapped(access=None, max_body_bytes=1024)
    stuck = ReadinessCalls("hang")
    server.routes, server.handles = {"m:v1": object()}, {"m:v1": stuck}

    server.answered_at["m:v1"] = time.monotonic()  # a prediction answered just now
    assert asyncio.run(server.readyz()).status_code == 200
    assert stuck.started == 0  # under load, no probe queues behind the predictions

    server.answered_at["m:v1"] -= gateway.READY_RECENT_S
    assert asyncio.run(server.readyz()).status_code == 503
    assert stuck.started > 0

    server.handles["m:v1"] = ReadinessCalls("ok")
    assert asyncio.run(server.readyz()).status_code == 200
    assert time.monotonic() - server.answered_at["m:v1"] < 1


def _route(name: str, version: int, acts: bool = False) -> gateway.Route:
    info = gateway.ModelInfo(
        name=name,
        version=f"v{version}",
        task="reinforcement" if acts else "classification",
        classes=[],
        input_shape=[4],
        inputs={},
        test_metrics={},
    )
    return gateway.Route(app=f"gw.{name}-v{version}", info=info, max_instances=8, acts=acts)


def test_the_newest_served_version_of_each_model_gets_its_predict_path_and_a_policy_none():
    routes = [
        _route("wafer", 2),
        _route("wafer", 10),
        _route("wafer", 3),
        _route("cartpole", 1, True),
    ]

    assert _direct_routes(routes, "/team/") == {
        "gw.wafer-v2": None,
        "gw.wafer-v10": "/team/v1/models/wafer/predict",  # by number, not by text
        "gw.wafer-v3": None,
        "gw.cartpole-v1": None,  # a policy answers /act, through the gateway
    }
    assert predict_path("/", "wafer") == "/v1/models/wafer/predict"


def test_a_gateway_name_with_a_dot_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="no '.'"):
        plan(AppArgs(models=["wafer"], storage={"root": str(tmp_path)}), gateway="team.a")


def test_what_a_model_replica_imports_leaves_the_metrics_library_out():
    """Predicting computes no metrics; torchmetrics' import pulls SciPy's signal module
    and matplotlib into a process (forgeml.tasks.metrics)."""
    tasks = ["classification", "regression", "forecast", "generative", "language_model"]
    imports = ", ".join(["forgeml.serve.apps", *(f"forgeml.tasks.{t}" for t in tasks)])
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, {imports}; "
            "print(sorted({'torchmetrics', 'matplotlib', 'scipy.signal'} & set(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"
