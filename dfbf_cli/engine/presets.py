"""Named budgets for synthesis and fine-tuning (``--preset``), shared by ``synthesize`` and ``compress``.

Small inputs (CIFAR's 32 px) are cheap to synthesise, so they get many more images than large
ones (YOLO's hundreds of pixels); the split is by input size alone, never by task. Fine-tuning is
budgeted in optimiser steps, not epochs, so the small synthetic set of a large-input model gets more
passes over it rather than eight times fewer updates; large inputs get more steps, as their recovery
is still climbing where a small input's has levelled off (docs/finetune.md, "How long").
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
    synthesis: SynthesisSettings
    finetune_steps_small: int
    finetune_steps_large: int

    def epochs(self, num_images: int, batch: int, imgsz: int) -> int:
        """Epochs that give this input size's optimiser steps over ``num_images`` images (full batches;
        fewer images than a batch make one batch)."""
        steps = self.finetune_steps_small if imgsz <= SMALL_INPUT else self.finetune_steps_large
        return math.ceil(steps / max(1, num_images // batch))

    def num_images(self, imgsz: int) -> int:
        return self.images_small if imgsz <= SMALL_INPUT else self.images_large

    def imgsz(self, model_imgsz: int) -> int:
        return min(model_imgsz, self.max_imgsz or model_imgsz)


DEFAULT_PRESET = "balanced"
PRESETS = {
    # steps: 5 epochs of 256 images in batches of 32
    "quick": Preset(256, 16, 256, SynthesisSettings(low_res_iterations=50, iterations=50), finetune_steps_small=40, finetune_steps_large=40),
    # 30 epochs of 1,024 small images; 800 epochs of 128 large ones (≈ 40 min for yolo11n-pose on 2 CPU cores with bf16)
    "balanced": Preset(1024, 128, 320, SynthesisSettings(low_res_iterations=100, iterations=100), finetune_steps_small=960, finetune_steps_large=3200),
    # 100 epochs of 4,096 small images; 800 of 512 large ones
    "paper": Preset(4096, 512, None, SynthesisSettings(low_res_iterations=2000, iterations=1000), finetune_steps_small=12800, finetune_steps_large=12800),
}
