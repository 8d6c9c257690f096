"""What each Ultralytics task changes for dfbf: its metrics (primary first), how a teacher's prediction becomes
a label line, which label lines fit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dfbf_cli.contract import Metric

KEYPOINT_VISIBLE = 0.5  # teacher keypoint confidence above which a pseudo-label marks it visible


def _box(result, k: int) -> list[float]:
    return result.boxes.xywhn[k].tolist()


def _pose(result, k: int) -> list[float]:
    fields = _box(result, k)
    for (x, y), c in zip(result.keypoints.xyn[k].tolist(), result.keypoints.conf[k].tolist()):
        fields += [x, y, 2] if c > KEYPOINT_VISIBLE else [0, 0, 0]
    return fields


def _polygon(result, k: int) -> list[float]:
    return [v for point in result.masks.xyn[k].tolist() for v in point]


def _corners(result, k: int) -> list[float]:
    return [v for point in result.obb.xyxyxyxyn[k].tolist() for v in point]


@dataclass(frozen=True)
class YoloTask:
    """What one Ultralytics task changes: its metrics (primary first), its label lines, its checks."""

    name: str
    metrics: tuple[tuple[str, str], ...]  # (dfbf's name, Ultralytics' results key)
    label_fields: Callable[[object, int], list[float]]  # a teacher's prediction k as label fields after the class
    fields_ok: Callable[[int, list[int]], bool]  # does a label line with this many values fit (kpt_shape given)
    fields_wanted: str

    @property
    def primary(self) -> Metric:
        return Metric(self.metrics[0][0])


BOX = (("box_map50_95", "metrics/mAP50-95(B)"), ("box_map50", "metrics/mAP50(B)"))
TASKS = {
    "detect": YoloTask("detect", BOX, _box, lambda n, _: n == 5, "4 box values"),
    "pose": YoloTask("pose", (("pose_map50_95", "metrics/mAP50-95(P)"), ("pose_map50", "metrics/mAP50(P)"), *BOX), _pose,
                     lambda n, kpt: n == 5 + kpt[0] * kpt[1], "4 box values and the keypoints of kpt_shape"),
    "segment": YoloTask("segment", (("mask_map50_95", "metrics/mAP50-95(M)"), ("mask_map50", "metrics/mAP50(M)"), *BOX), _polygon,
                        lambda n, _: n == 5 or (n >= 7 and n % 2 == 1), "a polygon (x y pairs) or 4 box values"),
    "obb": YoloTask("obb", BOX, _corners, lambda n, _: n == 9, "4 corner points (8 values)"),
}
SUPPORTED_TASKS = (*TASKS, "classify")
