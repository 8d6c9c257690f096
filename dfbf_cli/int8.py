"""OpenVINO INT8 by NNCF's post-training quantisation, in the recipes dfbf's accuracy-aware export compares.

NNCF (OpenVINO's own quantiser) does the work; a recipe only chooses its preset, its bias correction and
what stays in floating point. Adapters call this (it knows graphs, never tasks); the engine chooses the
recipe by agreement with the FP32 model on held-out synthetic images (docs/export.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dfbf_cli.settings import Int8Recipe

if TYPE_CHECKING:
    import openvino as ov

WEIGHTED_OPS = frozenset({"Convolution", "GroupConvolution", "MatMul"})


def output_layers(model: ov.Model, skip: Sequence[str] = ()) -> list[str]:
    """The weighted operations that write the model's outputs: walking back from each output, the first
    convolution or matrix product met (those in ``skip`` are passed through, as already kept in FP)."""
    skipped, found, seen = set(skip), [], set()
    stack = [result.input_value(0).get_node() for result in model.get_results()]
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        if node.get_type_name() in WEIGHTED_OPS and name not in skipped:
            found.append(name)
            continue
        if node.get_type_name() == "ShapeOf":  # reads a tensor's shape, not its values
            continue
        stack.extend(value.get_node() for value in node.input_values())
    return sorted(found)


def quantize_openvino(model: ov.Model, samples: Sequence[np.ndarray], recipe: Int8Recipe, keep_fp: Sequence[str] = ()) -> tuple[ov.Model, list[str]]:
    """``model`` in INT8, calibrated on ``samples`` (the model's own inputs, one batch each); returns it and the
    operations kept in floating point (``keep_fp``, plus the output layers for :attr:`Int8Recipe.OUTPUTS_FP`)."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # its per-node notes would bury dfbf's own output
    kept = [*keep_fp, *(output_layers(model, keep_fp) if recipe == Int8Recipe.OUTPUTS_FP else [])]
    quantized = nncf.quantize(
        model,
        nncf.Dataset(list(samples)),
        preset=nncf.QuantizationPreset.MIXED,  # asymmetric activations (YOLO's SiLU outputs dip below zero); Ultralytics' choice
        subset_size=len(samples),
        fast_bias_correction=recipe != Int8Recipe.BIAS_CORRECTION,
        ignored_scope=nncf.IgnoredScope(names=kept, validate=False) if kept else None,
    )
    return quantized, kept
