"""Named budgets for synthesis and fine-tuning (``--preset``), shared by ``synthesize`` and ``compress``.

Small inputs (CIFAR's 32 px) are cheap to synthesise, so they get many more images than large
ones (YOLO's hundreds of pixels); large inputs' few images get more optimisation steps each, as
their BatchNorm statistics limit what fine-tuning can recover (docs/synthesis.md, "Steps for large
inputs"). The split is by input size alone, never by task. Fine-tuning is
budgeted in optimiser steps, not epochs, so the small synthetic set of a large-input model gets more
passes over it rather than eight times fewer updates (docs/finetune.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dfbf_cli.engine.synthesis import SynthesisSettings

SMALL_INPUT = 64  # px: at most this is a "small" input


@dataclass(frozen=True)
class Preset:
    images_small: int
    images_large: int
    max_imgsz: int | None  # synthesis and fine-tuning size cap for large inputs (None: the model's own)
    synthesis_small: SynthesisSettings
    synthesis_large: SynthesisSettings
    finetune_steps: int

    def epochs(self, num_images: int, batch: int) -> int:
        """Epochs that give ``finetune_steps`` optimiser steps over ``num_images`` images (full batches;
        fewer images than a batch make one batch)."""
        return math.ceil(self.finetune_steps / max(1, num_images // batch))

    def num_images(self, imgsz: int) -> int:
        return self.images_small if imgsz <= SMALL_INPUT else self.images_large

    def synthesis(self, imgsz: int) -> SynthesisSettings:
        return self.synthesis_small if imgsz <= SMALL_INPUT else self.synthesis_large

    def imgsz(self, model_imgsz: int) -> int:
        return min(model_imgsz, self.max_imgsz or model_imgsz)


DEFAULT_PRESET = "balanced"
_QUICK = SynthesisSettings(low_res_iterations=50, iterations=50)
_PAPER = SynthesisSettings(low_res_iterations=2000, iterations=1000)  # the reference's
PRESETS = {
    "quick": Preset(256, 16, 256, _QUICK, _QUICK, finetune_steps=40),  # 5 epochs of 256 images in batches of 32
    "balanced": Preset(1024, 128, 320, SynthesisSettings(low_res_iterations=100, iterations=100),
                       SynthesisSettings(low_res_iterations=200, iterations=200), finetune_steps=960),  # 30 epochs of 1024
    "paper": Preset(4096, 512, None, _PAPER, _PAPER, finetune_steps=12800),  # 100 epochs of 4096
}
