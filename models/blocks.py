"""Building blocks of the 3D family: residual bottleneck block, SE, attention gate, heads.

Every block is pre-activation (norm -> LeakyReLU -> conv) and normalises with affine
InstanceNorm3d: per-channel statistics make Net2Net widening exact, because a replicated
channel has the same mean and variance as its original. BatchNorm is avoided (batch sizes
1-4) and so is GroupNorm (its groups mix channels, so widening would change its statistics).

Each branch that a grown network may add (SE, attention gate, residual block, transformer,
deep-supervision head) is residual or multiplicative around 1, so that zeroing its last
layer (`handoff_last_layers`) turns it into the identity.

Channel-space tags: `tag()` records, for each tensor of a leaf layer, which channel space
each dimension belongs to and its role ("out": rows of units, "in": inputs summed over,
"in_grouped": inputs within a group of a grouped conv). Spaces named with a leading "@"
are local to the layer's parent module (e.g. a block's hidden width). The hand-off uses
these tags to widen tensors consistently; see `ResUNet3D.handoff_spec`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

Dim = tuple[str, str] | None
"""One dimension's tag: (space, role) or None for a dimension that never widens."""

LEAKY_SLOPE = 0.01


def tag(module: nn.Module, out_space: str | None, in_space: str | None = None,
        groups: int = 1) -> nn.Module:
    """Record the channel spaces of a leaf layer's tensors (see the module docstring).

    Args:
        module: a Conv3d, ConvTranspose3d, Linear, InstanceNorm3d or LayerNorm.
        out_space: space of the output channels (None: fixed, e.g. the class logits).
        in_space: space of the input channels (None: fixed, e.g. the image channels).
        groups: the conv's groups; > 1 marks `out_space` as a grouped space.

    Returns:
        The module itself, with `handoff_dims` (and `handoff_groups`) attributes set.

    Raises:
        TypeError: a layer type the hand-off does not know how to widen.
    """
    out: Dim = (out_space, "out") if out_space else None
    role = "in_grouped" if groups > 1 else "in"
    inp: Dim = (in_space, role) if in_space else None
    dims: dict[str, tuple[Dim, ...]]
    if isinstance(module, nn.ConvTranspose3d):
        dims = {"weight": (inp, out, None, None, None)}
    elif isinstance(module, nn.Conv3d):
        dims = {"weight": (out, inp, None, None, None)}
    elif isinstance(module, nn.Linear):
        dims = {"weight": (out, inp)}
    elif isinstance(module, (nn.InstanceNorm3d, nn.LayerNorm)):
        dims = {"weight": (out,)}
    else:
        raise TypeError(f"cannot tag {type(module).__name__} for widening")
    if getattr(module, "bias", None) is not None:
        dims["bias"] = (out,)
    # torch types Module.__setattr__'s value Tensor | Module; any other value is a plain attribute
    module.handoff_dims = dims  # type: ignore[assignment]
    if groups > 1 and out_space:
        module.handoff_groups = {out_space: groups}  # type: ignore[assignment]  # as above
    return module


def norm(channels: int, space: str) -> nn.Module:
    """Affine InstanceNorm3d tagged with its channel space."""
    return tag(nn.InstanceNorm3d(channels, affine=True), space)


def act() -> nn.Module:
    """The family's activation."""
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=False)


def conv(in_ch: int, out_ch: int, kernel_vox: int, in_space: str | None, out_space: str | None,
         stride: int = 1, groups: int = 1, bias: bool = True) -> nn.Conv3d:
    """A 'same'-padded Conv3d tagged with its channel spaces."""
    layer = nn.Conv3d(in_ch, out_ch, kernel_vox, stride=stride, padding=kernel_vox // 2,
                      groups=groups, bias=bias)
    tag(layer, out_space, in_space, groups)
    return layer


class SqueezeExcitation(nn.Module):
    """Channel gate `x * 2 sigmoid(fc2(act(fc1(mean x))))`: identity when fc2 is zero.

    Args:
        channels: channels of x; space: their channel space.
        reduction: hidden width is max(channels // reduction, 4).
    """

    handoff_last_layers = ("fc2",)

    def __init__(self, channels: int, space: str, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = conv(channels, hidden, 1, space, "@hidden")
        self.act = act()
        self.fc2 = conv(hidden, channels, 1, "@hidden", space)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3, 4), keepdim=True)
        return x * (2.0 * torch.sigmoid(self.fc2(self.act(self.fc1(s)))))


class ResidualBlock(nn.Module):
    """Pre-activation bottleneck block `x + SE(conv3(conv2(conv1(x))))`, ResNeXt when grouped.

    conv1 (1x1x1) maps `channels` to `hidden` units, conv2 (3x3x3) has `cardinality`
    groups, conv3 (1x1x1) maps back; each conv is preceded by norm and activation.
    With cardinality 1 this is a ResNet bottleneck block; with cardinality > 1 and SE it
    is an SE-ResNeXt block.

    Args:
        channels: width of the residual stream; space: its channel space.
        hidden: width of the bottleneck (a multiple of cardinality).
        cardinality: groups of conv2.
        se: add squeeze-and-excitation on the branch output.
        se_reduction: SE hidden width divisor.

    Raises:
        ValueError: hidden is not a positive multiple of cardinality.
    """

    handoff_last_layers = ("conv3",)

    def __init__(self, channels: int, space: str, hidden: int, cardinality: int = 1,
                 se: bool = False, se_reduction: int = 4) -> None:
        super().__init__()
        if hidden < cardinality or hidden % cardinality:
            raise ValueError(f"block hidden width {hidden} must be a positive multiple of "
                             f"cardinality {cardinality}")
        self.norm1 = norm(channels, space)
        self.conv1 = conv(channels, hidden, 1, space, "@hidden")
        self.norm2 = norm(hidden, "@hidden")
        self.conv2 = conv(hidden, hidden, 3, "@hidden", "@hidden", groups=cardinality)
        self.norm3 = norm(hidden, "@hidden")
        self.conv3 = conv(hidden, channels, 1, "@hidden", space)
        self.act = act()
        self.se = SqueezeExcitation(channels, space, se_reduction) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.act(self.norm1(x)))
        y = self.conv2(self.act(self.norm2(y)))
        y = self.conv3(self.act(self.norm3(y)))
        if self.se is not None:
            y = self.se(y)
        return x + y


class Down(nn.Module):
    """Halve every side: norm -> act -> 3x3x3 conv with stride 2 (in_space -> out_space)."""

    def __init__(self, in_ch: int, out_ch: int, in_space: str, out_space: str) -> None:
        super().__init__()
        self.norm = norm(in_ch, in_space)
        self.act = act()
        self.conv = conv(in_ch, out_ch, 3, in_space, out_space, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class Up(nn.Module):
    """Double every side: norm -> act -> 2x2x2 transposed conv with stride 2."""

    def __init__(self, in_ch: int, out_ch: int, in_space: str, out_space: str) -> None:
        super().__init__()
        self.norm = norm(in_ch, in_space)
        self.act = act()
        self.conv = tag(nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2), out_space, in_space)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class AttentionGate(nn.Module):
    """Additive attention gate on a skip: `skip * 2 sigmoid(psi(act(norm(Wx skip + Wg g))))`.

    The gating signal g is the upsampled decoder feature (same width and resolution as the
    skip). The gate is 1 everywhere when psi is zero, so a new gate starts as identity.

    Args:
        channels: width of skip and g; space: their channel space.
        inter_channels: width of the gate's hidden features.
    """

    handoff_last_layers = ("psi",)

    def __init__(self, channels: int, space: str, inter_channels: int) -> None:
        super().__init__()
        self.theta = conv(channels, inter_channels, 1, space, "@hidden", bias=False)
        self.phi = conv(channels, inter_channels, 1, space, "@hidden")
        self.norm = norm(inter_channels, "@hidden")
        self.act = act()
        self.psi = conv(inter_channels, 1, 1, "@hidden", None)

    def forward(self, skip: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        q = self.act(self.norm(self.theta(skip) + self.phi(g)))
        return skip * (2.0 * torch.sigmoid(self.psi(q)))


class Head(nn.Module):
    """Segmentation head: norm -> act -> 1x1x1 conv to the class logits.

    Args:
        in_ch: width of the features; space: their channel space.
        out_channels: number of classes.
        branch: a deep-supervision head, i.e. a branch the hand-off zeroes when it is new.
    """

    def __init__(self, in_ch: int, out_channels: int, space: str, branch: bool = False) -> None:
        super().__init__()
        if branch:
            self.handoff_last_layers = ("conv",)
        self.norm = norm(in_ch, space)
        self.act = act()
        self.conv = conv(in_ch, out_channels, 1, space, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))
