"""Distillation fed by a meta-learned generator (Fast-Datafree style) instead of one fixed synthetic set:
docs/finetune.md, "A generator instead of a fixed set".

    .venv/bin/python benchmarks/generator_stream.py SYNTHETIC_DIR --source fixed [--images 384 [--first 384]] [--seed 1]
    .venv/bin/python benchmarks/generator_stream.py SYNTHETIC_DIR --source generator --rounds 40 --warmup 15 --kd-steps 24

CIFAR ResNet-56 at ratio 0.5: pruned with the energy criterion and refit on the set's first 128 images
(``dfbf prune --reconstruct``; with ``--plain``, L1 pruning alone, as the default ``dfbf compress``), then
distilled with compress's recipe (feature distance at the backbone's taps, Adam 1e-3 cosine, batch 32,
flips, shifts and CutMix, BatchNorm in train mode). ``fixed`` draws
batches from the synthetic set; ``generator`` from a pool that grows by one generated batch a round.
Each round clones the meta generator and optimises the clone and fresh latent codes for ``--g-steps``
steps (BatchNorm statistics, cross-entropy towards balanced labels, and with ``--adversarial`` away from
what the student already reproduces), accumulating the clone's gradients into the meta generator
(first-order MAML): each round starts from a generator that has learnt to make such images quickly.
After ``--warmup`` rounds, each round is followed by ``--kd-steps`` distillation steps on the pool.
Top-1 on the 5,000-image dev file at the start and the end; prints one JSON line. Run alone on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import asset, machine
from torch import nn

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.contract import ModelAdapter
from dfbf_cli.engine.features import FeatureTaps, tap_weights, weighted_distance
from dfbf_cli.engine.finetune import augment, cutmix, reattach_head
from dfbf_cli.engine.pruning import choose, prune
from dfbf_cli.engine.reconstruct import refit_pruned
from dfbf_cli.engine.synthesis import BatchNormStatsLoss, frozen
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import Criterion, Distance, PruneSettings, ReconstructSettings, TapWeighting

CPU = torch.device("cpu")
BATCH, LR, REFIT_IMAGES = 32, 1e-3, 128
BN_WEIGHT, FIRST_BN = 0.01, 10.0  # dfbf's synthesis weights (SynthesisSettings)


class Generator(nn.Module):
    """Latent code → image in [0, 1]: a linear layer to an 8×8 map, two upsampling convolutions (DCGAN-like)."""

    def __init__(self, latent: int, width: int, size: int):
        super().__init__()
        self.start = size // 4
        self.project = nn.Linear(latent, 2 * width * self.start**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 3, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(len(z), -1, self.start, self.start))


class GeneratorStream:
    """Each :meth:`round` adds one batch of generated images (uint8) to the pool."""

    def __init__(self, teacher: ModelAdapter, student: ModelAdapter, args: argparse.Namespace, imgsz: int, classes: int):
        self.teacher, self.student, self.args, self.classes = teacher, student, args, classes
        self.meta = Generator(args.latent, args.width, imgsz)
        self.meta_optimizer = torch.optim.Adam(self.meta.parameters(), lr=args.lr_g * args.g_steps, betas=(0.5, 0.999))
        self.random = torch.Generator().manual_seed(args.seed + 7)
        self.pool: list[torch.Tensor] = []
        self.made = 0

    def round(self, adversarial: float) -> dict:
        args = self.args
        t_split, s_split = self.teacher.split(), self.student.split()
        fast = copy.deepcopy(self.meta).train()
        z = torch.randn(args.g_batch, args.latent, generator=self.random).requires_grad_(True)
        labels = (torch.arange(args.g_batch) % self.classes)[torch.randperm(args.g_batch, generator=self.random)]
        optimizer = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": args.lr_z}], lr=args.lr_g, betas=(0.5, 0.999))
        self.meta_optimizer.zero_grad(set_to_none=True)
        taps = s_split.feature_taps
        weights = tap_weights(TapWeighting.LINEAR, len(taps))
        best, best_loss, stats = None, math.inf, {}
        with (frozen(self.teacher.model), frozen(self.student.model), BatchNormStatsLoss(t_split.backbone, FIRST_BN) as bn,
              FeatureTaps(self.student.model, taps) as s_taps, FeatureTaps(self.teacher.model, taps) as t_taps):
            for _ in range(args.g_steps):
                images = fast(z)
                x = self.teacher.input_spec.normalize(augment(images, self.random))
                class_loss = F.cross_entropy(t_split.head(t_split.backbone(x)), labels)
                bn_loss = bn.value()
                loss = BN_WEIGHT * bn_loss + class_loss
                if adversarial > 0:
                    s_split.backbone(x)
                    loss = loss - adversarial * weighted_distance(s_taps.take(), t_taps.take(), weights, Distance.L1)[0]
                s_taps.outputs.clear(), t_taps.outputs.clear()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for meta_p, fast_p in zip(self.meta.parameters(), fast.parameters()):  # first-order MAML: the meta step sums the clone's gradients
                    meta_p.grad = fast_p.grad.clone() if meta_p.grad is None else meta_p.grad + fast_p.grad
                optimizer.step()
                if loss.item() < best_loss:
                    best_loss, best = loss.item(), images.detach()
                stats = {"bn": round(bn_loss.item(), 1), "ce": round(class_loss.item(), 3)}
        self.meta_optimizer.step()
        self.pool.append(best.clamp(0, 1).mul(255).round().to(torch.uint8))
        self.made += len(best)
        return stats

    def images(self) -> torch.Tensor:
        return torch.cat(self.pool)


def distil_steps(student: ModelAdapter, teacher: ModelAdapter, images: torch.Tensor, optimizer: torch.optim.Optimizer, steps: range,
                 total: int, generator: torch.Generator) -> float:
    """``steps`` of compress's distillation on batches drawn from ``images``; the mean loss."""
    s_split, t_split = student.split(), teacher.split()
    taps = s_split.feature_taps
    weights = tap_weights(TapWeighting.LINEAR, len(taps))
    s_split.backbone.train()
    losses = []
    with FeatureTaps(student.model, taps) as s_taps, FeatureTaps(teacher.model, taps) as t_taps:
        for step in steps:
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * LR * (1 + math.cos(math.pi * step / total))
            chosen = torch.randint(0, len(images), (BATCH,), generator=generator)
            x = student.input_spec.normalize(cutmix(augment(images[chosen].float().div(255), generator), generator))
            with torch.no_grad():
                t_split.backbone(x)
                targets = t_taps.take()
            s_split.backbone(x)
            loss = weighted_distance(s_taps.take(), targets, weights, Distance.L1)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    s_split.backbone.eval()
    return sum(losses) / max(len(losses), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("synthetic", type=Path, help="the CIFAR synthetic set: its first 128 images select and refit; --source fixed trains on all")
    parser.add_argument("--source", choices=("fixed", "generator"), default="generator")
    parser.add_argument("--steps", type=int, default=960, help="distillation steps (--source fixed)")
    parser.add_argument("--images", type=int, default=0, help="train on N of the set's images only (--source fixed; 0: all)")
    parser.add_argument("--first", type=int, default=0, help="with --images, the index of the first (another N are another draw)")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="rounds that only train the generator")
    parser.add_argument("--g-steps", type=int, default=5)
    parser.add_argument("--g-batch", type=int, default=128)
    parser.add_argument("--kd-steps", type=int, default=16, help="distillation steps after each round past the warm-up")
    parser.add_argument("--lr-g", type=float, default=5e-3)
    parser.add_argument("--lr-z", type=float, default=0.015)
    parser.add_argument("--latent", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--adversarial", type=float, default=0.0)
    parser.add_argument("--with-fixed", action="store_true", help="the pool starts with the whole synthetic set")
    parser.add_argument("--plain", action="store_true", help="start from plain L1 pruning (the default compress), not energy + refit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    original = load_model("cifar-resnet56", str(asset("models/cifar10-resnet56.th")))
    labelled = load_data(str(asset("data/cifar10-test-dev.npz")))
    fixed = SyntheticDataset.open(args.synthetic).load()[0]
    selection = fixed[:REFIT_IMAGES].float().div(255)
    settings = PruneSettings(0.5, criterion=Criterion.L1 if args.plain else Criterion.ENERGY)
    started = time.perf_counter()
    chosen = choose(original, settings, images=None if args.plain else selection)
    student, _ = prune(original, settings, chosen)
    if not args.plain:
        refit_pruned(student, original, settings.scope, chosen, fixed[:REFIT_IMAGES], ReconstructSettings(), device=CPU)

    def score() -> float:
        return round(student.evaluate(labelled, imgsz=32, batch=500, device=CPU)["top1"], 2)

    result = {"machine": machine(CPU), **vars(args), "synthetic": str(args.synthetic), "refit_s": round(time.perf_counter() - started, 1),
              "start": score()}
    params = list(student.split().backbone.parameters())
    optimizer = torch.optim.Adam(params, lr=LR)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    if args.source == "fixed":
        fixed = fixed[args.first : args.first + args.images] if args.images else fixed
        loss = distil_steps(student, original, fixed, optimizer, range(args.steps), args.steps, generator)
        result |= {"distil_s": round(time.perf_counter() - started, 1), "images": len(fixed)}
    else:
        stream = GeneratorStream(original, student, args, 32, original.synthesis_classes())
        if args.with_fixed:
            stream.pool.append(fixed)
        total = (args.rounds - args.warmup) * args.kd_steps
        synth_s, loss, trace = 0.0, math.nan, []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            stats = stream.round(args.adversarial if r >= args.warmup else 0.0)
            synth_s += time.perf_counter() - t0
            if r >= args.warmup:
                done = (r - args.warmup) * args.kd_steps
                loss = distil_steps(student, original, stream.images(), optimizer, range(done, done + args.kd_steps), total, generator)
            for p in params:
                p.requires_grad_(True)
            if r % 5 == 4 or r == args.rounds - 1:
                trace.append({"round": r + 1, **stats, "kd_loss": round(loss, 4), "s": round(time.perf_counter() - started)})
                print(json.dumps(trace[-1]), flush=True)
        result |= {"distil_s": round(time.perf_counter() - started, 1), "synthesis_s": round(synth_s, 1), "images": stream.made, "trace": trace}
    reattach_head(student, original, settings.scope)
    result |= {"final_loss": round(loss, 4), "end": score()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
