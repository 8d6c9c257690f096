"""The Ultralytics layer graph as dfbf reads it: the forward loop over a slice of layers (backbone and head
as modules), and the convolutions whose channels can be cut, found by block type."""

from __future__ import annotations

import torch
from torch import nn

from dfbf_cli.contract import ChannelGroup, ChannelSlice, channel_group


def layer_sources(layer: nn.Module) -> list[int]:
    """Absolute indices of the layers whose outputs ``layer`` reads."""
    froms = layer.f if isinstance(layer.f, list) else [layer.f]
    return [layer.i + f if f < 0 else f for f in froms]


def run_layers(layers: list[nn.Module], saved: dict[int, torch.Tensor]) -> torch.Tensor:
    """Ultralytics' forward loop over a slice of layers; ``saved`` maps layer index to output (-1: input)."""
    for layer in layers:
        sources = layer_sources(layer)
        x = layer(saved[sources[0]] if isinstance(layer.f, int) else [saved[j] for j in sources])
        saved[layer.i] = x
    return x


class YoloBackbone(nn.Module):
    def __init__(self, layers: list[nn.Module], outputs: tuple[int, ...]):
        super().__init__()
        self.layers, self.outputs = nn.ModuleList(layers), outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        saved = {-1: x}
        run_layers(list(self.layers), saved)
        return tuple(saved[i] for i in self.outputs)


class YoloHead(nn.Module):
    def __init__(self, layers: list[nn.Module], inputs: tuple[int, ...]):
        super().__init__()
        self.layers, self.inputs = nn.ModuleList(layers), inputs

    def forward(self, features: tuple[torch.Tensor, ...]):
        return run_layers(list(self.layers), dict(zip(self.inputs, features)))


def plain_conv(module: nn.Module) -> bool:
    """An Ultralytics ``Conv`` (conv + BN + activation) whose channels can be cut independently."""
    from ultralytics.nn.modules import Conv

    return type(module) is Conv and module.conv.groups == 1


def output_conv(layer: nn.Module) -> str | None:
    """Relative name of the Conv that produces a layer's output ('' for a Conv layer), if cuttable."""
    from ultralytics.nn.modules import C2PSA, C3, SPPF, C2f

    if plain_conv(layer):
        return ""
    for kind, name in ((C2f, "cv2"), (C3, "cv3"), (SPPF, "cv2"), (C2PSA, "cv2")):
        if isinstance(layer, kind) and not getattr(layer, "add", False) and plain_conv(getattr(layer, name)):
            return name
    return None


def input_convs(layer: nn.Module) -> list[str]:
    """Names (relative, ending in ``.conv``) of the convs that read a layer's input; [] if not cuttable."""
    from ultralytics.nn.modules import C2PSA, C3, SPPF, C2f

    if plain_conv(layer):
        return ["conv"]
    if isinstance(layer, C3) and plain_conv(layer.cv1) and plain_conv(layer.cv2):
        return ["cv1.conv", "cv2.conv"]
    if isinstance(layer, (C2f, C2PSA)) or (isinstance(layer, SPPF) and not getattr(layer, "add", False)):
        return ["cv1.conv"] if plain_conv(layer.cv1) else []
    return []


def hidden_groups(prefix: str, layer: nn.Module) -> list[ChannelGroup]:
    """Channels that live and die inside a block: Bottleneck and PSA feed-forward hidden widths,
    C3's second branch (read by cv3 after the first branch's channels), SPPF's pooled copies."""
    from ultralytics.nn.modules.block import C3, SPPF, Bottleneck, PSABlock

    groups = []
    for rel, module in layer.named_modules():
        name = f"{prefix}.{rel}" if rel else prefix
        pair = None
        if isinstance(module, Bottleneck):
            pair = (module.cv1, f"{name}.cv1", [f"{name}.cv2.conv"], module.cv2)
        elif isinstance(module, PSABlock) and len(module.ffn) == 2:
            pair = (module.ffn[0], f"{name}.ffn.0", [f"{name}.ffn.1.conv"], module.ffn[1])
        elif isinstance(module, C3) and plain_conv(module.cv3):
            hidden = module.cv1.conv.out_channels
            pair = (module.cv2, f"{name}.cv2", [ChannelSlice(f"{name}.cv3.conv", hidden)], module.cv3)
        elif isinstance(module, SPPF) and plain_conv(module.cv2):
            width, copies = module.cv1.conv.out_channels, getattr(module, "n", 3) + 1
            pair = (module.cv1, f"{name}.cv1", [ChannelSlice(f"{name}.cv2.conv", k * width) for k in range(copies)], module.cv2)
        if pair and plain_conv(pair[0]) and plain_conv(pair[3]):
            producer, produced, consumers, _ = pair
            groups.append(channel_group(produced, prefix, producer.conv.out_channels, [f"{produced}.conv", f"{produced}.bn"], consumers))
    return groups


@torch.no_grad()
def output_widths(layers: list[nn.Module]) -> dict[int, int]:
    """Channels of every layer's output before the task module, from one small forward pass."""
    saved = {-1: torch.zeros(1, 3, 64, 64, device=next(layers[0].parameters()).device)}
    run_layers(layers[:-1], saved)
    return {i: x.shape[1] for i, x in saved.items()}
