"""Spike-driven Transformer v2 (Meta-SpikeFormer; Yao et al., ICLR 2024) with its spike-driven
self-attention (SDSA) or STAtten.

Numerically identical to the official ``classification/models.py`` (``Spiking_vit_MetaFormer``;
``../shared/reference/sdtv2/SPEC.md``): two conv stages (``MS_ConvBlock`` with a ``SepConv``),
then 6 + 2 attention blocks whose q/k/v/projection are ``RepConv`` layers followed by a second
BatchNorm, and a LIF before the head (and the optional distillation head ``head_kd``). Module and
parameter names are the official ones, so official state_dicts load as they are.

``RepConv``'s ``BNAndPadLayer`` pads its BatchNorm output with the value the BatchNorm gives a zero
input according to its running statistics; in train mode those statistics already include the
current batch's update, as in the official code (SPEC 4.3.1).

Unlike the official class, ``T`` is a constructor argument (the official code sets the attribute
``model.T`` from ``--time_steps`` and stores it nowhere), and event frames ``[B, T, C, H, W]`` go
through the network directly, as SPEC section 2 describes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from statten.attention import SpatioTemporalAttention
from statten.layers import (
    ATTENTION_V_THRESHOLD,
    drop_path_per_sample,
    init_linear_trunc_normal,
    merge_heads,
    per_step,
    split_heads,
)
from statten.models.base import SpikingModel
from statten.models.family import (
    COMMON_OPTIONS,
    FamilyOption,
    ModelFamily,
    build_model,
    check_common_config,
    default_cfg,
    filter_state_dict,
    register_family,
)
from statten.neurons import LIF

__all__ = [
    "ATTENTION_MODES",
    "BNAndPadLayer",
    "MetaSpikeFormer",
    "RepConv",
    "checkpoint_filter_fn",
]

ATTENTION_MODES = ("SDSA", "STAtten")
SDSA_SCALE = 0.125  # the official constant, whatever the head width
MLP_RATIO = 4  # the conv blocks hard-code a 4x hidden width (SPEC 4.2)
BLOCKS = (6, 2)  # attention blocks of stages 3 and 4, fixed (SPEC 5)


class BNAndPadLayer(nn.Module):
    """BatchNorm2d, then a border of ``pad`` pixels holding, per channel, what the BatchNorm
    outputs for a zero input according to its running statistics (read after this call's update;
    the BatchNorm's weight and bias detached): ``beta - mu * gamma / sqrt(var + eps)``.

    In eval mode this equals zero-padding before the BatchNorm, so that a following unpadded
    3x3 convolution re-parameterises into one padded 3x3 convolution (official ``BNAndPadLayer``).
    """

    def __init__(self, pad: int, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def border_value(self) -> torch.Tensor:
        bn = self.bn
        return bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(
            bn.running_var + bn.eps
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pad(self.bn(x), [self.pad] * 4)
        value = self.border_value().view(1, -1, 1, 1)
        p = self.pad
        out[:, :, :p, :] = value
        out[:, :, -p:, :] = value
        out[:, :, :, :p] = value
        out[:, :, :, -p:] = value
        return out


class RepConv(nn.Sequential):
    """1x1 conv, :class:`BNAndPadLayer`, 3x3 depthwise conv (no padding), 1x1 conv, BatchNorm:
    a 3x3 convolution that re-parameterises into one conv + bias at inference (official
    ``RepConv``, modules ``body.0`` ... ``body.2.2``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            BNAndPadLayer(1, in_channels),
            nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, groups=in_channels, bias=False),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            ),
        )


def _rep_conv_bn(dim: int) -> nn.Sequential:
    """A RepConv and a second BatchNorm in series (the q/k/v/projection layers, SPEC 4.3.2)."""
    return nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))


class DownSampling(nn.Module):
    """``encode_bn(encode_conv(encode_lif(x)))`` per step (official ``MS_DownSampling``); the
    first one reads the real-valued image and has no neuron."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int, first: bool = False
    ) -> None:
        super().__init__()
        self.encode_conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2)
        self.encode_bn = nn.BatchNorm2d(out_channels)
        if not first:
            self.encode_lif = LIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "encode_lif"):
            x = self.encode_lif(x)
        return per_step((self.encode_conv, self.encode_bn), x)


class SepConv(nn.Module):
    """``bn2(pwconv2(dwconv(lif2(bn1(pwconv1(lif1(x)))))))``: 1x1 to 2C, 7x7 depthwise, 1x1 back
    (official ``SepConv``; no BatchNorm between the depthwise and the second pointwise conv)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = 2 * dim
        self.lif1 = LIF()
        self.pwconv1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.lif2 = LIF()
        self.dwconv = nn.Conv2d(hidden, hidden, 7, padding=3, groups=hidden, bias=False)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = per_step((self.pwconv1, self.bn1), self.lif1(x))
        return per_step((self.dwconv, self.pwconv2, self.bn2), self.lif2(x))


class ConvBlock(nn.Module):
    """``r = x + SepConv(x)``, then ``r + bn2(conv2(lif2(bn1(conv1(lif1(r))))))`` with 3x3 convs
    through a 4x wider hidden layer (official ``MS_ConvBlock``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.Conv = SepConv(dim)
        self.lif1 = LIF()
        self.conv1 = nn.Conv2d(dim, dim * MLP_RATIO, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim * MLP_RATIO)
        self.lif2 = LIF()
        self.conv2 = nn.Conv2d(dim * MLP_RATIO, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.Conv(x)
        y = per_step((self.conv1, self.bn1), self.lif1(x))
        return x + per_step((self.conv2, self.bn2), self.lif2(y))


class SpikeDrivenSelfAttention(nn.Module):
    """Meta-SpikeFormer's attention (official ``MS_Attention_RepConv_qkv_id``), or STAtten.

    ``s = head_lif(x)``; ``Q, K, V = LIF(BN(RepConv(s)))``; ``attn_lif(0.125 * Q (K^T V))`` per
    step (``chunk_size = 1``) or over blocks of ``chunk_size`` steps; projection ``BN(RepConv(.))``.
    Returns the residual branch (real-valued).
    """

    def __init__(self, dim: int, num_heads: int, attention_mode: str, chunk_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_lif = LIF()
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_conv", _rep_conv_bn(dim))
            setattr(self, f"{name}_lif", LIF())
        self.statten = SpatioTemporalAttention(chunk_size if attention_mode == "STAtten" else 1)
        self.attn_lif = LIF(v_threshold=ATTENTION_V_THRESHOLD)
        self.proj_conv = _rep_conv_bn(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.head_lif(x)
        q, k, v = (
            getattr(self, f"{name}_lif")(per_step(getattr(self, f"{name}_conv"), s))
            for name in ("q", "k", "v")
        )
        q, k, v = (split_heads(t.flatten(3), self.num_heads) for t in (q, k, v))
        out = self.attn_lif(merge_heads(self.statten(q, k, v, SDSA_SCALE)))
        return per_step(self.proj_conv, out.view(x.shape))


class SpikingMLP(nn.Module):
    """``fc2_bn(fc2_conv(fc2_lif(fc1_bn(fc1_conv(fc1_lif(x))))))`` per token, Conv1d k=1
    (official ``MS_MLP``). Returns the residual branch (real-valued)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1_lif = LIF()
        self.fc1_conv = nn.Conv1d(dim, hidden_dim, 1)
        self.fc1_bn = nn.BatchNorm1d(hidden_dim)
        self.fc2_lif = LIF()
        self.fc2_conv = nn.Conv1d(hidden_dim, dim, 1)
        self.fc2_bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = per_step((self.fc1_conv, self.fc1_bn), self.fc1_lif(x.flatten(3)))
        return per_step((self.fc2_conv, self.fc2_bn), self.fc2_lif(y)).view(x.shape)


class MetaBlock(nn.Module):
    """``x + attn(x)``, then ``x + mlp(x)`` (official ``MS_Block``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        attention_mode: str,
        chunk_size: int,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = SpikeDrivenSelfAttention(dim, num_heads, attention_mode, chunk_size)
        self.mlp = SpikingMLP(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path_per_sample(self.attn(x), self.drop_path, self.training)
        return x + drop_path_per_sample(self.mlp(x), self.drop_path, self.training)


class MetaSpikeFormer(SpikingModel):
    """Spike-driven Transformer v2: conv stages of widths ``embed_dims[0..1]``, then 6 attention
    blocks at ``embed_dims[2]`` and 2 at ``embed_dims[3]``, a LIF on the token average, and a
    linear head (averaged over time).

    Takes images ``[B, C, H, W]`` (repeated over ``T`` steps) or event frames ``[B, T, C, H, W]``.
    With ``kd`` a second head ``head_kd`` reads the same spikes: in train mode the model returns
    the pair ``(logits, logits_kd)``, in eval mode their average, as the official code does.
    """

    family_name = "sdtv2"

    def __init__(
        self,
        img_size: int = 224,
        in_channels: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (128, 256, 512, 640),
        num_heads: int = 8,
        mlp_ratio: float = 4,
        T: int = 1,
        chunk_size: int = 1,
        attention_mode: str = "SDSA",
        kd: bool = False,
        drop_path_rate: float = 0.0,
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        check_config(locals())
        c0, c1, c2, c3 = (int(c) for c in embed_dims)
        self.img_size = img_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.embed_dims = [c0, c1, c2, c3]
        self.num_features = c3
        self.T = T
        self.kd = kd
        self.downsample1_1 = DownSampling(in_channels, c0 // 2, 7, 2, first=True)
        self.ConvBlock1_1 = nn.ModuleList([ConvBlock(c0 // 2)])
        self.downsample1_2 = DownSampling(c0 // 2, c0, 3, 2)
        self.ConvBlock1_2 = nn.ModuleList([ConvBlock(c0)])
        self.downsample2 = DownSampling(c0, c1, 3, 2)
        self.ConvBlock2_1 = nn.ModuleList([ConvBlock(c1)])
        self.ConvBlock2_2 = nn.ModuleList([ConvBlock(c1)])
        self.downsample3 = DownSampling(c1, c2, 3, 2)
        drop_rates = iter(torch.linspace(0, drop_path_rate, sum(BLOCKS), device="cpu").tolist())

        def blocks(dim: int, count: int) -> nn.ModuleList:
            return nn.ModuleList(
                MetaBlock(dim, num_heads, mlp_ratio, attention_mode, chunk_size, next(drop_rates))
                for _ in range(count)
            )

        self.block3 = blocks(c2, BLOCKS[0])
        self.downsample4 = DownSampling(c2, c3, 3, 1)
        self.block4 = blocks(c3, BLOCKS[1])
        self.lif = LIF()
        self.head = nn.Linear(c3, num_classes) if num_classes > 0 else nn.Identity()
        if kd:
            self.head_kd = nn.Linear(c3, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_trunc_normal)
        self.memory_efficient = memory_efficient

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` input -> token-averaged features ``[T, B, embed_dims[3]]``."""
        stages: list[Callable[[torch.Tensor], torch.Tensor]] = [
            self.downsample1_1, *self.ConvBlock1_1, self.downsample1_2, *self.ConvBlock1_2,
            self.downsample2, *self.ConvBlock2_1, *self.ConvBlock2_2, self.downsample3,
            *self.block3, self.downsample4, *self.block4,
        ]  # fmt: skip
        for stage in stages:
            x = stage(x)
        return x.flatten(3).mean(3)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        spikes = self.lif(x)
        if pre_logits:
            return spikes
        logits = self.head(spikes).mean(0)
        if not self.kd:
            return logits
        logits_kd = self.head_kd(spikes).mean(0)
        return (logits, logits_kd) if self.training else (logits + logits_kd) / 2

    def loss(self, output: Any, target: torch.Tensor, criterion: Callable) -> torch.Tensor:
        """The training loss: with ``kd``, both heads on the labels, weighted 0.5 each (the
        official hard distillation when the teacher's prediction is the label)."""
        if not self.kd:
            return criterion(output, target)
        logits, logits_kd = output
        return 0.5 * criterion(logits, target) + 0.5 * criterion(logits_kd, target)

    def batchnorm_folds(self) -> list[tuple[nn.Module, str, str]]:
        """The conv -> BatchNorm pairs that fold at inference: the downsampling layers, the conv
        blocks, the MLPs and the last conv + BN of every RepConv. (A RepConv's BNAndPadLayer
        and the BatchNorm after a RepConv stay.)"""
        pairs: list[tuple[nn.Module, str, str]] = []
        for module in self.modules():
            if isinstance(module, DownSampling):
                pairs.append((module, "encode_conv", "encode_bn"))
            elif isinstance(module, SepConv):
                pairs += [(module, "pwconv1", "bn1"), (module, "pwconv2", "bn2")]
            elif isinstance(module, ConvBlock):
                pairs += [(module, "conv1", "bn1"), (module, "conv2", "bn2")]
            elif isinstance(module, SpikingMLP):
                pairs += [(module, "fc1_conv", "fc1_bn"), (module, "fc2_conv", "fc2_bn")]
            elif isinstance(module, RepConv):
                pairs.append((module.body[2], "1", "2"))
        return pairs


def check_config(args: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for constructor arguments that do not make a Meta-SpikeFormer."""
    dims = args["embed_dims"]
    if len(dims) != 4 or any(int(c) != c or c < 2 for c in dims) or dims[0] % 2:
        raise ValueError(f"embed_dims must be 4 stage widths (the first even), got {list(dims)!r}")
    if args["mlp_ratio"] != MLP_RATIO:
        raise ValueError(
            f"mlp_ratio must be {MLP_RATIO}: the conv blocks hard-code a 4x hidden width "
            f"(got {args['mlp_ratio']})"
        )
    for width in dims[2:]:
        check_common_config({**args, "embed_dims": width}, ATTENTION_MODES, "sdtv2")


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Adapt an official (or DDP / ``torch.compile``) state_dict: strips wrapper prefixes (the
    official file has no never-used parameters)."""
    return filter_state_dict(state_dict, ())


default_cfgs = generate_default_cfgs(
    {
        "sdtv2.untrained": default_cfg(
            num_classes=1000, input_size=(3, 224, 224), first_conv="downsample1_1.encode_conv"
        )
    }
)


@register_model
def sdtv2(pretrained: bool = False, **kwargs: Any) -> MetaSpikeFormer:
    """Spike-driven Transformer v2 (Meta-SpikeFormer); the default widths are the 55.4 M model."""
    return build_model(MetaSpikeFormer, "sdtv2", pretrained, checkpoint_filter_fn, **kwargs)


# The official factories, as ``args.model`` of the official checkpoints names them.
REFERENCE_ARCHS = ("metaspikformer_8_384", "metaspikformer_8_512", "metaspikformer_8_768")


def reference_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """Model keyword arguments equivalent to what ``main_finetune.py`` built from ``args``:
    the factory named by ``--model`` (8 heads), ``--nb_classes``, ``--kd`` and ``--time_steps``.
    """
    return {
        "embed_dims": stage_widths(int(str(args["model"]).rsplit("_", 1)[1])),
        "num_classes": int(args.get("nb_classes", 1000)),
        "num_heads": 8,
        "T": int(args.get("time_steps", 1)),
        "kd": bool(args.get("kd", False)),
    }


def stage_widths(dim: int) -> list[int]:
    """The official factories' widths for ``metaspikformer_8_<dim>``: D/4, D/2, D, 5D/4."""
    return [dim // 4, dim // 2, dim, dim * 5 // 4]


def _derived_kwargs(cfg: Any, event_data: bool) -> dict[str, Any]:
    """Without ``--stage-dims`` the widths follow ``--dim`` as in the official factories."""
    return {} if cfg.stage_dims is not None else {"embed_dims": stage_widths(cfg.dim)}


FAMILY = register_family(
    ModelFamily(
        name="sdtv2",
        model_class=MetaSpikeFormer,
        attention_modes=ATTENTION_MODES,
        check_config=check_config,
        reference_kwargs=reference_kwargs,
        checkpoint_filter_fn=checkpoint_filter_fn,
        reference_archs=REFERENCE_ARCHS,
        common_options=tuple(key for key in COMMON_OPTIONS if key not in ("dim", "layer")),
        options=(
            FamilyOption(
                "stage_dims",
                "sdtv2: the four stage widths (default: D/4, D/2, D, 5D/4 of --dim, as the "
                "official factories; 512 gives the 55.4 M model)",
                type=int,
                nargs=4,
                kwarg="embed_dims",
            ),
            FamilyOption(
                "kd",
                "sdtv2: a second (distillation) head; both are trained on the labels",
                flag=True,
            ),
        ),
        derived_kwargs=_derived_kwargs,
        linear_probe_frozen=("downsample1", "ConvBlock1"),
    )
)
