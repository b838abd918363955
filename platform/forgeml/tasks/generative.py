"""Image generation: a VAE trained on the ELBO, a GAN trained adversarially.

Both learn from the images alone (the target is the input map, as category codes) and
both draw new images. After training, ``sample_report`` draws ``task.samples`` images,
saves a grid of them as ``samples.png`` in the model package and, when a ``judge`` is
configured, has that registered classifier rate them, and the real test maps beside
them: how many it assigns to a defect class with high confidence, and how the classes
it sees are spread.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from forgeml.config import ImageGenerationTask as ImageGenerationConfig
from forgeml.config import JudgeConfig
from forgeml.data.base import TargetSpec
from forgeml.data.images import WAFER_MAX
from forgeml.tasks import register_task

if TYPE_CHECKING:
    import torchmetrics

#: Images drawn or rated per forward pass.
DRAW_BATCH = 256
#: Seeds the draws of ``sample_report``: one model always reports the same numbers.
REPORT_SEED = 0


class ImageGeneration:
    """What the VAE and the GAN share: codes as targets, drawing, the sample report."""

    target_dtype = torch.int64
    evaluation_batch_size = DRAW_BATCH
    headline_metrics = ()  # no simple baseline draws or writes text

    def __init__(self, cfg: ImageGenerationConfig, target: TargetSpec):
        self.cfg = cfg
        self.categories = target.vocab_size
        self.num_outputs = target.vocab_size

    def predict(self, outputs: tuple) -> tuple:
        return tuple(output.float() for output in outputs)

    def test_metrics(self) -> torchmetrics.MetricCollection:
        return self.validation_metrics()

    def report(self, computed: dict[str, torch.Tensor]) -> dict:
        return {name: float(value) for name, value in computed.items()}

    @torch.no_grad()
    def draw(self, model: nn.Module, count: int, generator: torch.Generator) -> np.ndarray:
        """``count`` new images as (count, H, W) uint8 codes."""
        model.eval()
        parts = [
            model.draw(min(DRAW_BATCH, count - start), generator).cpu().numpy()
            for start in range(0, count, DRAW_BATCH)
        ]
        return np.concatenate(parts).astype(np.uint8)

    def sample_report(
        self, model: nn.Module, test_maps: np.ndarray, judge: Judge | None
    ) -> tuple[dict, dict[str, bytes]]:
        """Metrics of ``cfg.samples`` drawn images (rated by the judge, if any, beside
        the real ``test_maps``) and the package files that show them."""
        drawn = self.draw(model, self.cfg.samples, torch.Generator().manual_seed(REPORT_SEED))
        files = {"samples.png": map_grid_png(drawn[:64], self.categories - 1)}
        if judge is None:
            return {}, files
        generated, real = judge.rate(drawn), judge.rate(test_maps)
        distance = 0.5 * sum(
            abs(generated["class_share"][name] - real["class_share"][name])
            for name in generated["class_share"]
        )
        metrics = {
            "judged_defect_share": generated["confident_defect_share"],
            "judged_defect_share_test_maps": real["confident_defect_share"],
            "judged_class_distance": distance,
            "judge": {
                "model": judge.ref,
                "min_confidence": judge.cfg.min_confidence,
                "no_defect_class": judge.cfg.no_defect_class,
                "generated": generated,
                "test_maps": real,
            },
        }
        return metrics, files


@register_task("vae")
class VAETask(ImageGeneration):
    """The loss is the negative ELBO per image in nats: the reconstruction's negative
    log-likelihood (a categorical per pixel) plus the KL divergence of the posterior
    from the standard normal prior. Test metrics are per image in nats, and the
    negative ELBO in bits per pixel."""

    @staticmethod
    def _terms(outputs: tuple, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: reconstruction negative log-likelihood and KL divergence."""
        logits, mu, logvar = outputs
        nll = F.cross_entropy(logits.float(), codes, reduction="none").flatten(1).sum(1)
        mu, logvar = mu.float(), logvar.float()
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)
        return nll, kl

    def loss(self, outputs: tuple, codes: torch.Tensor) -> torch.Tensor:
        nll, kl = self._terms(outputs, codes)
        return (nll + kl).mean()

    def validation_metrics(self) -> torchmetrics.MetricCollection:
        from torchmetrics import MetricCollection

        from forgeml.tasks.metrics import RowMean

        return MetricCollection({"reconstruction_error": RowMean(self._reconstruction_error)})

    @staticmethod
    def _reconstruction_error(outputs: tuple, codes: torch.Tensor) -> torch.Tensor:
        """Per image, the share of pixels whose most likely reconstructed value is wrong."""
        return (outputs[0].argmax(1) != codes).flatten(1).float().mean(1)

    def test_metrics(self) -> torchmetrics.MetricCollection:
        from torchmetrics import MetricCollection

        from forgeml.tasks.metrics import RowMean

        return MetricCollection(
            {
                "elbo": RowMean(lambda out, codes: -sum(self._terms(out, codes))),
                "reconstruction_nll": RowMean(lambda out, codes: self._terms(out, codes)[0]),
                "kl": RowMean(lambda out, codes: self._terms(out, codes)[1]),
                "reconstruction_error": RowMean(self._reconstruction_error),
                "bits_per_pixel": RowMean(
                    lambda out, codes: (
                        sum(self._terms(out, codes)) / (codes[0].numel() * math.log(2))
                    )
                ),
            }
        )

    def row_outputs(self, predicted: tuple, codes: torch.Tensor) -> np.ndarray:
        """Per image, the negative ELBO."""
        return sum(self._terms(predicted, codes)).numpy()

    def drift_values(self, negative_elbo: np.ndarray) -> dict[str, np.ndarray]:
        return {"negative_elbo": negative_elbo}


@register_task("gan")
class GANTask(ImageGeneration):
    """The non-saturating GAN loss: the discriminator's cross-entropy on real (1) and
    generated (0) maps plus the generator's on generated maps taken for real (1). The
    two players step together on each batch, each with its own gradient (see
    ``models.generative.DCGAN``)."""

    def loss(self, outputs: tuple, codes: torch.Tensor) -> torch.Tensor:
        real, fake, generated = (output.float() for output in outputs)
        bce = F.binary_cross_entropy_with_logits
        discriminator = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
        return discriminator + bce(generated, torch.ones_like(generated))

    def validation_metrics(self) -> torchmetrics.MetricCollection:
        """How often the discriminator tells real from generated: near 0.5 while the game
        is balanced, near 1 when it wins outright (the generator has stopped learning)."""
        from torchmetrics import MetricCollection

        from forgeml.tasks.metrics import RowMean

        return MetricCollection(
            {
                "discriminator_accuracy": RowMean(
                    lambda out, codes: ((out[0] > 0).float() + (out[1] < 0).float()).squeeze(1) / 2
                )
            }
        )

    def row_outputs(self, predicted: tuple, codes: torch.Tensor) -> np.ndarray:
        """Per real image, the discriminator's probability that it is real."""
        return torch.sigmoid(predicted[0]).squeeze(1).numpy()

    def drift_values(self, real_scores: np.ndarray) -> dict[str, np.ndarray]:
        return {"real_score": real_scores}


@dataclass
class Judge:
    """A registered image classifier (model, preprocessor and task of a loaded package)
    that rates images."""

    ref: str
    cfg: JudgeConfig
    model: nn.Module
    preprocessor: object
    task: object

    @torch.no_grad()
    def rate(self, maps: np.ndarray) -> dict:
        """Of (N, H, W) maps: the share the classifier assigns to a defect class with at
        least ``min_confidence``, to any class with it, and the share of each class it
        finds most probable."""
        self.model.eval()
        probabilities = np.concatenate(
            [
                self.task.predict(
                    self.model(torch.from_numpy(self.preprocessor.standardize(part)))
                ).numpy()
                for part in np.array_split(maps, max(1, math.ceil(len(maps) / DRAW_BATCH)))
            ]
        )
        names = self.task.class_names
        top, confident = probabilities.argmax(1), probabilities.max(1) >= self.cfg.min_confidence
        defect = top != names.index(self.cfg.no_defect_class)
        return {
            "maps": int(len(maps)),
            "confident_defect_share": float((confident & defect).mean()),
            "confident_share": float(confident.mean()),
            "class_share": {name: float((top == k).mean()) for k, name in enumerate(names)},
        }


#: Colours of wafer die codes in sample grids: outside the wafer, good die, defective die.
WAFER_COLOURS = np.array([[236, 236, 236], [96, 160, 208], [204, 40, 40]], np.uint8)


def map_grid_png(maps: np.ndarray, max_value: int, columns: int = 8, scale: int = 4) -> bytes:
    """(N, H, W) code maps as one PNG, ``columns`` maps a row, each pixel ``scale``
    pixels wide: wafer maps in die colours, other images as grey levels."""
    if max_value == WAFER_MAX:
        coloured = WAFER_COLOURS[maps]
    else:
        coloured = np.repeat(
            (maps.astype(np.float64) * 255 / max_value).astype(np.uint8)[..., None], 3, -1
        )
    coloured = coloured.repeat(scale, 1).repeat(scale, 2)
    count, height, width, _ = coloured.shape
    rows, gap = math.ceil(count / columns), scale
    grid = np.full((rows * (height + gap) + gap, columns * (width + gap) + gap, 3), 255, np.uint8)
    for i, image in enumerate(coloured):
        top, left = gap + (i // columns) * (height + gap), gap + (i % columns) * (width + gap)
        grid[top : top + height, left : left + width] = image
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return buffer.getvalue()


def code_maps(batches: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """The (N, H, W) code maps of a transformed split's batches."""
    return np.concatenate([batch["inputs"] for batch in batches]).astype(np.uint8)
