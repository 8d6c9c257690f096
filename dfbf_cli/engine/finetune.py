"""DFBF's intermediate supervision: teach the pruned model to reproduce the original's features.

On synthetic images, teacher and student run side by side up to the pruned scope's end; the loss is a
weighted sum, over the feature taps (outputs that pruning kept at their original shape, the scope's
final outputs included), of the distance between student and teacher feature maps, deeper taps
weighted more. Only the student's pruned scope trains; the original head is put back unchanged at
the end. Each epoch ends with an atomic checkpoint, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dfbf_cli.contract import ModelAdapter
from dfbf_cli.engine.distributed import check_batch_split, current, rank_mean
from dfbf_cli.engine.features import FeatureTaps, tap_weights, weighted_distance
from dfbf_cli.engine.progress import ProgressCallback, ProgressEvent, ignore
from dfbf_cli.engine.runtime import autocast
from dfbf_cli.errors import DfbfError
from dfbf_cli.files import atomic_path
from dfbf_cli.settings import BatchNormMode, FinetuneSettings, Optimizer, Scope, SynthesisSettings

SGD_MOMENTUM = 0.9


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts (reflection-padded) up to 1/8 of the image size."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    return padded[:, :, dy : dy + h, dx : dx + w]


def cutmix(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Paste the same random box (of a uniformly drawn share of the area) from a shuffled partner into
    every image: new inputs for the teacher to describe, from the same fixed synthetic set."""
    n, _, h, w = images.shape
    partner = torch.randperm(n, generator=generator).to(images.device)
    share = float(torch.rand(1, generator=generator)) ** 0.5
    bh, bw = int(h * share), int(w * share)
    y, x = (int(torch.randint(0, size - box + 1, (1,), generator=generator)) for size, box in ((h, bh), (w, bw)))
    mixed = images.clone()
    mixed[:, :, y : y + bh, x : x + bw] = images[partner, :, y : y + bh, x : x + bw]
    return mixed


RENEW_LR = 0.05  # inversion steps from a warm start move less than from noise


class RenewedPool:
    """The synthetic images fine-tuning draws from, ``settings.renew`` of them renewed each epoch: a random
    few, cut-mixed and shifted, then a few inversion steps towards the teacher's BatchNorm statistics and
    (with ``settings.adversarial``) away from what the student already reproduces. A stream of fresh
    images at a fraction of the cost of new ones from noise; the same seed gives the same stream."""

    def __init__(self, images: torch.Tensor, teacher: ModelAdapter, settings: FinetuneSettings, seed: int, device: torch.device):
        self.images, self.teacher, self.settings, self.seed, self.device = images.clone(), teacher, settings, seed, device

    def renew(self, epoch: int, student_backbone: nn.Module, taps: tuple[FeatureTaps, FeatureTaps], weights: list[float],
              generator: torch.Generator) -> None:
        from dfbf_cli.engine.synthesis import frozen, synthesize_batch

        settings = self.settings
        count = min(settings.renew, len(self.images))
        chosen = torch.randperm(len(self.images), generator=generator)[:count]
        start = cutmix(augment(self.images[chosen].float().div(255), generator), generator)
        s_taps, t_taps = taps

        def disagreement(inputs: torch.Tensor) -> torch.Tensor:
            student_backbone(inputs)
            return -settings.adversarial * weighted_distance(s_taps.take(), t_taps.take(), weights, settings.loss)[0]

        inversion = SynthesisSettings(low_res_iterations=0, iterations=settings.renew_steps, lr=RENEW_LR, jitter=0)
        with frozen(student_backbone):
            fresh, _ = synthesize_batch(self.teacher.split(), self.teacher.input_spec, inversion, count=count, imgsz=self.images.shape[-1],
                                        seed=self.seed * 1_000_003 + epoch, device=self.device, precision=settings.precision, start=start,
                                        extra_loss=disagreement if settings.adversarial > 0 else None)
        s_taps.outputs.clear(), t_taps.outputs.clear()  # the inversion's own passes are not training targets
        self.images[chosen] = fresh
        world = current()
        if world.distributed:  # every rank trains on rank 0's stream
            import torch.distributed as dist

            dist.broadcast(self.images, src=0)


def _optimizer(params: list[nn.Parameter], settings: FinetuneSettings) -> torch.optim.Optimizer:
    if settings.optimizer == Optimizer.ADAM:
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=SGD_MOMENTUM, weight_decay=settings.weight_decay)


def _cosine_lr(settings: FinetuneSettings, epoch: int) -> float:
    return 0.5 * settings.lr * (1 + math.cos(math.pi * epoch / settings.epochs))


def _tap_shapes(adapter: ModelAdapter, scope: Scope, imgsz: int) -> list[tuple[str, torch.Size]]:
    split = adapter.split(scope)
    device = next(adapter.model.parameters()).device
    with torch.no_grad(), FeatureTaps(adapter.model, split.feature_taps) as taps:
        split.backbone.eval()(torch.zeros(1, 3, imgsz, imgsz, device=device))
        return list(zip(split.feature_taps, (t.shape for t in taps.take())))


def fitting_scope(student: ModelAdapter, teacher: ModelAdapter, imgsz: int) -> Scope:
    """The narrowest scope at whose taps student and teacher agree in shape: where the student was pruned."""
    student.check_same_kind(teacher)
    for scope in Scope:
        if _tap_shapes(student, scope, imgsz) == _tap_shapes(teacher, scope, imgsz):
            return scope
    raise DfbfError(f"Teacher {teacher.name} does not match the student at any of its feature taps: give the unpruned model that the student was pruned from.")


def check_compatible(student: ModelAdapter, teacher: ModelAdapter, imgsz: int, scope: Scope) -> None:
    """The teacher must be the student's unpruned original: same kind, same taps of the same shapes."""
    student.check_same_kind(teacher)
    for (name, s_shape), (_, t_shape) in zip(_tap_shapes(student, scope, imgsz), _tap_shapes(teacher, scope, imgsz)):
        if s_shape != t_shape:
            raise DfbfError(
                f"Teacher {teacher.name} does not match the student at {name} ({tuple(t_shape)} vs {tuple(s_shape)}) in scope "
                f"'{scope}': give the unpruned model that the student was pruned from, and the scope it was pruned in."
            )


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    tap_losses: list[float]
    images_per_second: float


def _load_state(state_path: Path, identity: dict) -> dict:
    """An interrupted run's checkpoint (tensors and plain values only: nothing in it can run code)."""
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise DfbfError(f"{state_path} is not a readable fine-tuning checkpoint ({str(error).splitlines()[0]}); delete it to start over.") from error
    if not isinstance(state, dict) or not {"model", "optimizer", "generator", "epoch", "identity", "history"} <= state.keys():
        raise DfbfError(f"{state_path} is not a dfbf fine-tuning checkpoint; delete it to start over.")
    if state["identity"] != identity:
        changed = sorted(k for k in {*identity, *state["identity"]} if identity.get(k) != state["identity"].get(k))
        raise DfbfError(f"{state_path} was made with other fine-tuning inputs or settings ({', '.join(changed)} differ); "
                        "resume with the same ones, or delete it.")
    return state


class Distillation:
    """One fine-tuning run, in the order it happens: set up (models, optimiser, generator, the renewed pool),
    :meth:`resume` from an interrupted run's checkpoint, :meth:`distribute` under torchrun, :meth:`epoch` after
    epoch each followed by :meth:`checkpoint`, and :meth:`finish` (the teacher's head reattached)."""

    def __init__(self, student: ModelAdapter, teacher: ModelAdapter, images: torch.Tensor, *, settings: FinetuneSettings, scope: Scope,
                 device: torch.device, seed: int, state_path: Path, data_id: str):
        settings.validate()
        check_compatible(student, teacher, images.shape[-1], scope)
        self.student, self.teacher, self.images, self.settings, self.scope = student, teacher, images, settings, scope
        self.device, self.state_path = device, state_path
        self.s_split, self.t_split = student.split(scope), teacher.split(scope)
        self.taps = self.s_split.feature_taps
        self.weights = tap_weights(settings.tap_weights, len(self.taps))
        student.model.to(device).requires_grad_(False)
        teacher.model.to(device).eval().requires_grad_(False)
        self.params = list(self.s_split.backbone.parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = _optimizer(self.params, settings)
        self.generator = torch.Generator().manual_seed(seed)
        self.identity = {**settings.to_dict(), "scope": str(scope), "seed": seed, "data": data_id, "images": len(images)}  # any process count may resume
        self.history: list[EpochRecord] = []
        self.start_epoch = 0
        self.pool = RenewedPool(images, teacher, settings, seed, device) if settings.renew else None
        self.batch = min(settings.batch, len(images))
        self.steps = len(images) // self.batch  # drop the ragged last batch: BatchNorm statistics need full batches
        check_batch_split(self.batch)
        world = current()
        self.main = world.main
        self.share = slice(world.rank * self.batch // world.size, (world.rank + 1) * self.batch // world.size)  # this rank's part of every batch
        self.trained: nn.Module = self.s_split.backbone

    def resume(self, allowed: bool) -> None:
        """Continue from the checkpoint at ``state_path`` if there is one (only when ``allowed``)."""
        if self.state_path.exists():
            if not allowed:
                raise DfbfError(f"{self.state_path} holds an interrupted fine-tuning run: pass --resume to continue it, or delete it.")
            state = _load_state(self.state_path, self.identity)
            self.student.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            self.history, self.start_epoch = [EpochRecord(**r) for r in state["history"]], state["epoch"]
            if self.pool is not None:
                self.pool.images = state["pool"]

    def distribute(self) -> None:
        """Under torchrun, wrap the student (once its weights are final for the start) so that gradients are averaged over the ranks."""
        if current().distributed:  # the same steps as one process with the whole batch
            from torch.nn.parallel import DistributedDataParallel

            self.trained = DistributedDataParallel(self.s_split.backbone, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def epoch(self, epoch: int, taps: tuple[FeatureTaps, FeatureTaps], on_progress: ProgressCallback) -> EpochRecord:
        """One pass over the images (renewed first, with --renew); a loss or weights that stop being finite end the run."""
        settings, (s_taps, t_taps) = self.settings, taps
        for group in self.optimizer.param_groups:
            group["lr"] = _cosine_lr(settings, epoch)
        if self.pool is not None and epoch > 0:
            self.pool.renew(epoch, self.s_split.backbone.eval(), taps, self.weights, self.generator)
            self.images = self.pool.images
        self.trained.train(settings.bn == BatchNormMode.TRAIN)
        order = torch.randperm(len(self.images), generator=self.generator)
        started, total, tap_totals = time.perf_counter(), 0.0, torch.zeros(len(self.taps))
        for step in range(self.steps):
            x = augment(self.images[order[step * self.batch : (step + 1) * self.batch]].float().div(255), self.generator)
            if settings.cutmix:
                x = cutmix(x, self.generator)
            loss, losses = self._step(self.student.input_spec.normalize(x[self.share].to(self.device)), s_taps, t_taps, epoch, step)
            total += loss
            tap_totals += losses
            on_progress(ProgressEvent("finetune", epoch + (step + 1) / self.steps, settings.epochs, {
                "epoch": f"{epoch + 1}/{settings.epochs}", "loss": total / (step + 1), "taps": tap_summary((tap_totals / (step + 1)).tolist()),
                "img/s": (step + 1) * self.batch / (time.perf_counter() - started)}))
        if not all(math.isfinite(float(p.detach().abs().sum())) for p in self.params):
            self._diverged(f"at epoch {epoch + 1} (the weights are no longer finite)")
        return EpochRecord(epoch + 1, rank_mean(total / self.steps), [rank_mean(v) for v in (tap_totals / self.steps).tolist()],
                           self.steps * self.batch / (time.perf_counter() - started))

    def _step(self, x: torch.Tensor, s_taps: FeatureTaps, t_taps: FeatureTaps, epoch: int, step: int) -> tuple[float, torch.Tensor]:
        """One optimiser step on the normalised batch ``x``: its loss and per-tap losses."""
        with autocast(self.settings.precision, self.device):
            with torch.no_grad():
                self.t_split.backbone(x)
                targets = t_taps.take()
            self.trained(x)
            loss, losses = weighted_distance(s_taps.take(), targets, self.weights, self.settings.loss)
        if rank_mean(float(torch.isfinite(loss))) != 1.0:  # under torchrun, every rank stops together
            self._diverged(f"at epoch {epoch + 1}, step {step + 1} (the loss is {loss.item()})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item(), losses.detach().cpu()

    def _diverged(self, where: str) -> None:
        self.state_path.unlink(missing_ok=True)  # a diverging run is not worth resuming
        raise DfbfError(f"Fine-tuning diverged {where}; nothing was saved: lower --lr (now {self.settings.lr:g}).")

    def checkpoint(self, record: EpochRecord) -> None:
        """Record the finished epoch; rank 0 writes the checkpoint a resumed run starts from."""
        self.history.append(record)
        if self.main:
            with atomic_path(self.state_path) as tmp:
                torch.save({"model": self.student.model.state_dict(), "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                            "epoch": record.epoch, "identity": self.identity, "history": [asdict(r) for r in self.history],
                            **({"pool": self.pool.images} if self.pool is not None else {})}, tmp)

    def finish(self) -> list[EpochRecord]:
        self.student.model.eval().requires_grad_(False)
        reattach_head(self.student, self.teacher, self.scope)
        self.student.weights_changed()
        return self.history


def finetune(
    student: ModelAdapter, teacher: ModelAdapter, images: torch.Tensor, *, settings: FinetuneSettings, scope: Scope, device: torch.device,
    seed: int, state_path: Path, resume: bool = False, data_id: str = "", on_progress: ProgressCallback = ignore,
) -> list[EpochRecord]:
    """Train ``student``'s pruned scope in place to mimic ``teacher``'s features on ``images`` (uint8 N×3×H×W).

    ``data_id`` identifies the images (a resumed run must train on the same); a loss that stops being
    finite ends the run with a :class:`DfbfError`, leaving neither model nor checkpoint. Under torchrun the
    student is a DistributedDataParallel: every rank draws the same batch and trains on its share of it
    (its BatchNorm statistics are its own share's), rank 0 writes the checkpoint."""
    run = Distillation(student, teacher, images, settings=settings, scope=scope, device=device, seed=seed, state_path=state_path, data_id=data_id)
    run.resume(resume)
    run.distribute()
    with FeatureTaps(student.model, run.taps) as s_taps, FeatureTaps(teacher.model, run.taps) as t_taps:
        for epoch in range(run.start_epoch, settings.epochs):
            run.checkpoint(run.epoch(epoch, (s_taps, t_taps), on_progress))
    return run.finish()


def tap_summary(tap_losses: list[float]) -> str:
    """Loss of the shallow, middle and deep thirds of the taps (or each tap, when there are few)."""
    if len(tap_losses) <= 3:
        return " ".join(f"{v:.3f}" for v in tap_losses)
    thirds = [tap_losses[i * len(tap_losses) // 3 : (i + 1) * len(tap_losses) // 3] for i in range(3)]
    return "shallow/mid/deep " + "/".join(f"{sum(t) / len(t):.3f}" for t in thirds)


def reattach_head(student: ModelAdapter, teacher: ModelAdapter, scope: Scope) -> None:
    """Copy the original head's weights (and buffers) into the student: the head is the teacher's, bit for bit."""
    teacher_modules = dict(teacher.model.named_modules())
    for name in student.split(scope).head_modules:
        student.model.get_submodule(name).load_state_dict(teacher_modules[name].state_dict())
