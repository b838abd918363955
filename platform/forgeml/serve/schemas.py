"""Typed HTTP requests and responses of the Serve application, one schema per task input."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from forgeml.data.images import to_channels

#: One value of an image channel; each model checks its own range (wafer maps 0-2).
Pixel = Annotated[int, Field(ge=0, le=255)]

#: The image files a request may hold, by the format PIL names.
IMAGE_FILE_FORMATS = ("PNG", "JPEG")


class ImageInstance(BaseModel):
    """One square image: an array of values, rows of values (grey, wafer maps: die
    codes, 0 outside, 1 good, 2 defect) or rows of [R, G, B]; or a base64-encoded PNG or
    JPEG file (lossless PNG where values are codes). Exactly one of the two. A grey image
    given to a colour model is repeated into R, G and B; a colour one given to a grey
    model is made grey as PIL does (alpha dropped)."""

    model_config = ConfigDict(extra="forbid")

    image: list[list[Pixel]] | list[list[list[Pixel]]] | None = Field(
        None, description="Rows of values, or rows of [R, G, B]."
    )
    image_base64: str | None = Field(None, description="Base64 of a PNG or JPEG file.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageInstance:
        if (self.image is None) == (self.image_base64 is None):
            raise ValueError("give exactly one of 'image' or 'image_base64'")
        return self

    def to_array(self, channels: int) -> np.ndarray:
        """The image as a (H, W, ``channels``) uint8 array; ValueError with a reason if it
        is not one."""
        if self.image is not None:
            try:
                array = np.asarray(self.image, dtype=np.uint8)
            except ValueError:
                raise ValueError("'image' rows have different lengths") from None
            if array.ndim not in (2, 3):
                raise ValueError("'image' must be rows of values or rows of [R, G, B]")
            if array.ndim == 3 and array.shape[-1] not in (1, 3):
                raise ValueError(f"'image' pixels hold {array.shape[-1]} values, not 1 or 3")
        else:
            array = _decoded_file(self.image_base64, channels)
        return to_channels(array[None], channels)[0]


def _decoded_file(encoded: str, channels: int) -> np.ndarray:
    """The values of a base64 PNG or JPEG file, grey or RGB as ``channels`` asks."""
    try:
        raw = base64.b64decode(encoded, validate=True)
        with Image.open(io.BytesIO(raw)) as file:
            if file.format not in IMAGE_FILE_FORMATS:
                raise ValueError(f"'image_base64' holds {file.format}, not PNG or JPEG")
            mode = "RGB" if channels == 3 else "L"
            return np.asarray(file if file.mode == mode else file.convert(mode), np.uint8)
    except binascii.Error:
        raise ValueError("'image_base64' is not valid base64") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError("'image_base64' does not hold a readable PNG or JPEG file") from None


#: One row of a table: feature name to value; an absent or null feature is missing.
FeatureRecord = dict[str, float | int | str | bool | None]


class SeriesInstance(BaseModel):
    """The last ``window`` values of a series, oldest first, for a forecast from now."""

    model_config = ConfigDict(extra="forbid")

    history: list[float | None] = Field(
        min_length=1, description="Values, oldest first; null where missing."
    )


def _instance_kind(value) -> str:
    if isinstance(value, ImageInstance) or (
        isinstance(value, dict) and {"image", "image_base64"} & value.keys()
    ):
        return "image"
    if isinstance(value, SeriesInstance) or (isinstance(value, dict) and set(value) == {"history"}):
        return "series"
    return "features"


Instance = Annotated[
    Annotated[ImageInstance, Tag("image")]
    | Annotated[SeriesInstance, Tag("series")]
    | Annotated[FeatureRecord, Tag("features")],
    Discriminator(_instance_kind),
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[Instance] = Field(
        min_length=1,
        description="Images (image models), feature records (tabular and text "
        "models) or series histories (forecasters).",
    )


class ClassPrediction(BaseModel):
    label: str = Field(description="Most probable class.")
    confidence: float = Field(description="Its probability.")
    probabilities: dict[str, float] = Field(description="Probability per class.")


class ValuePrediction(BaseModel):
    value: float = Field(description="Predicted value, in the target's units.")


class ForecastPrediction(BaseModel):
    forecast: list[float] = Field(description="One value per horizon step, in the series' units.")


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[ClassPrediction | ValuePrediction | ForecastPrediction]


class ExplainRequest(PredictRequest):
    target: str | None = Field(
        None, description="Class to explain every instance for; default: each one's prediction."
    )


class Attribution(BaseModel):
    feature: str = Field(description="A table feature, or a text token as position:token.")
    attribution: float = Field(description="How much it moved the explained output.")


class Explanation(BaseModel):
    prediction: ClassPrediction | ValuePrediction
    explained: str = Field(description="The class explained, or value for a regressor.")
    method: Literal["gradcam", "shap"] = Field(
        description="Grad-CAM (images) or SHAP values (tables and text)."
    )
    heatmap: list[list[float]] | None = Field(
        None, description="Images: Grad-CAM over the map, summing to 1."
    )
    attributions: list[Attribution] | None = Field(
        None,
        description="Tables and text: the largest eight SHAP values, in the explained "
        "output's units (a class's logit, a regressor's value). All of a row's features' "
        "values, listed or not, add up to its output minus the reference's: the all-zeros "
        "model input (by default every numeric feature at its training mean and no "
        "category), or the empty text.",
    )


class ExplainResponse(BaseModel):
    model: str
    version: str
    explanations: list[Explanation]


class ActRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    observations: list[list[Annotated[float, Field(allow_inf_nan=False)]]] = Field(
        min_length=1,
        description="A batch of observations, each a flat list of numbers exactly as the "
        "environment returns it.",
    )


class ActResponse(BaseModel):
    model: str
    version: str
    actions: list[int] | list[list[float]] = Field(
        description="The policy's greedy action for each observation: an index for discrete "
        "actions, else a vector in the environment's units."
    )
    probabilities: list[list[float]] | None = Field(
        None, description="PPO with discrete actions: each action's probability."
    )
    q_values: list[list[float]] | None = Field(None, description="DQN: each action's Q-value.")


class ModelInfo(BaseModel):
    name: str
    version: str
    task: str
    classes: list[str] = Field(
        description="Classes, in output order; empty for regression and policies."
    )
    input_shape: list[int]
    inputs: dict = Field(
        description="What an instance holds: an image's size, or features; for a policy, "
        "its observation and action spaces."
    )
    test_metrics: dict[str, float]


class ErrorBody(BaseModel):
    code: int
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorBody
