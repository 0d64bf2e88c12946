"""Spikformer (Zhou et al., ICLR 2023) with its native spiking self-attention or STAtten.

Numerically identical to the three model files of the official code (``variant``: ``"cifar10"``,
``"cifar10dvs"``, ``"imagenet"``; ``../shared/reference/spikformer/SPEC.md``). Module and
parameter names are the official ones, so official state_dicts load once
:func:`checkpoint_filter_fn` has dropped the parameters the official code creates but never uses
(``norm1``/``norm2`` of every block, the DVS file's ``pos_embed`` and ``norm``).

The residual stream keeps each file's own layout, because the layout decides which PyTorch op
computes the projections (``nn.Linear`` on ``[T*B, N, D]`` in the CIFAR file, ``nn.Conv1d`` on
``[T*B, D, N]`` in the others) and thereby their rounding: CIFAR ``[T, B, N, D]``, DVS
``[T, B, D, N]``, ImageNet ``[T, B, D, Hg, Wg]``.

The token mix is :class:`~statten.attention.SpatioTemporalAttention`: with ``chunk_size = 1``
(``attention_mode="SSA"``) it is Spikformer's per-step ``s * Q K^T V``, with larger chunks
STAtten's attention over blocks of consecutive steps (SPEC section 13). Every value of the
product is an exact multiple of the scale ``s`` in float32, so computing ``Q (K^T V)`` instead of
the CIFAR and DVS files' ``(Q K^T) V`` gives bit-identical forward values (gradients agree to
rounding) at lower cost when the head width is below the token count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from statten.attention import SpatioTemporalAttention
from statten.layers import (
    ATTENTION_V_THRESHOLD,
    conv_bn_lif,
    drop_path_per_sample,
    init_linear_trunc_normal,
    split_heads,
)
from statten.models.base import SpikingModel
from statten.models.family import (
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
    "VARIANTS",
    "Spikformer",
    "SpikformerBlock",
    "SpikformerMLP",
    "SpikformerPatchEmbed",
    "SpikingSelfAttention",
    "checkpoint_filter_fn",
]

ATTENTION_MODES = ("SSA", "STAtten")


@dataclass(frozen=True)
class Variant:
    """What differs between the official model files (SPEC section 7).

    ``pooled_stages``: patch-embedding stages followed by a stride-2 max pool; ``token_layer``:
    ``"linear"`` (``nn.Linear`` on channels-last tokens) or ``"conv"`` (``nn.Conv1d``, kernel 1,
    on channels-first tokens) for q/k/v/proj; ``mlp_layer``: the same for the MLP, or
    ``"conv2d"`` (1x1 ``nn.Conv2d`` on the token grid); ``qkv_bias``: whether q/k/v carry a bias;
    ``scale``: the constant of ``s * Q K^T V``; ``stream``: the layout of the residual stream
    (``"tokens_last"`` ``[T, B, N, D]``, ``"tokens"`` ``[T, B, D, N]``, ``"grid"``
    ``[T, B, D, Hg, Wg]``); ``img_size``, ``in_channels`` and ``event_input``: the official
    input.
    """

    pooled_stages: tuple[int, ...]
    token_layer: str
    mlp_layer: str
    qkv_bias: bool
    scale: float
    stream: str
    img_size: int
    in_channels: int
    event_input: bool = False

    @property
    def patch_stride(self) -> int:
        return 2 ** len(self.pooled_stages)


VARIANTS = {
    "cifar10": Variant((2, 3), "linear", "linear", True, 0.125, "tokens_last", 32, 3),
    "cifar10dvs": Variant((0, 1, 2, 3), "conv", "conv", False, 0.25, "tokens", 128, 2, True),
    "imagenet": Variant((0, 1, 2, 3), "conv", "conv2d", False, 0.125, "grid", 224, 3),
}
STAGE_SUFFIXES = ("", "1", "2", "3")


def _token_layer(kind: str, in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    """The per-token weight layer of a variant: Linear, Conv1d (k=1) or Conv2d (1x1)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    if kind == "conv":
        return nn.Conv1d(in_dim, out_dim, kernel_size=1, bias=bias)
    return nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=bias)


def _layer_bn_lif(layer: nn.Module, bn: nn.Module, lif: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``lif(bn(layer(x)))`` per time step, as the official files compute it.

    For ``nn.Linear`` the tokens are channels-last ``[T, B, N, C]`` and the BatchNorm1d runs on
    the transposed ``[T*B, C, N]``; for convolutions they are channels-first. With the BatchNorm
    folded into the Linear (fast inference) nothing is transposed, and ``conv_bn_lif`` lets a
    fused LIF write its spikes over the layer's output.
    """
    if not isinstance(layer, nn.Linear):
        return conv_bn_lif(layer, bn, lif, x, recompute=True)
    if isinstance(bn, nn.Identity):
        return conv_bn_lif(layer, bn, lif, x)
    T, B, N, _ = x.shape
    y = layer(x.flatten(0, 1))
    y = bn(y.transpose(-1, -2)).transpose(-1, -2).reshape(T, B, N, -1).contiguous()
    return lif(y)


class SpikformerPatchEmbed(nn.Module):
    """Spiking patch splitting (official ``SPS``): four 3x3 conv + BN + LIF stages
    (``D/8, D/4, D/2, D`` channels) with max pools after ``pooled_stages``, then the relative
    position embedding ``rpe_lif(rpe_bn(rpe_conv(F)))`` added to the stage-4 spikes ``F``.
    """

    def __init__(self, in_channels: int, embed_dims: int, pooled_stages: tuple[int, ...]) -> None:
        super().__init__()
        widths = [in_channels, embed_dims // 8, embed_dims // 4, embed_dims // 2, embed_dims]
        for stage, suffix in enumerate(STAGE_SUFFIXES):
            conv = nn.Conv2d(widths[stage], widths[stage + 1], 3, padding=1, bias=False)
            setattr(self, f"proj_conv{suffix}", conv)
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm2d(widths[stage + 1]))
            setattr(self, f"proj_lif{suffix}", LIF())
            if stage in pooled_stages:
                setattr(self, f"maxpool{suffix}", nn.MaxPool2d(3, stride=2, padding=1))
        self.rpe_conv = nn.Conv2d(embed_dims, embed_dims, 3, padding=1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dims)
        self.rpe_lif = LIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` -> token grid ``[T, B, D, Hg, Wg]`` (values 0, 1 or 2)."""
        for suffix in STAGE_SUFFIXES:
            layers = (getattr(self, f"proj_{name}{suffix}") for name in ("conv", "bn", "lif"))
            x = conv_bn_lif(*layers, x, pool=getattr(self, f"maxpool{suffix}", None))
        return x + conv_bn_lif(self.rpe_conv, self.rpe_bn, self.rpe_lif, x)


class SpikingSelfAttention(nn.Module):
    """Spikformer's spiking self-attention (official ``SSA``), or STAtten in its place.

    ``Q, K, V = LIF(BN(W x))`` on the (integer-valued) residual stream, then
    ``attn_lif(s * Q K^T V)`` per step (``chunk_size = 1``) or over blocks of ``chunk_size``
    steps, then ``proj_lif(proj_bn(W_p .))``. Returns the residual branch (spikes) in the
    layout of its input.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        variant: Variant,
        attention_mode: str,
        chunk_size: int,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = variant.scale
        self.layer = variant.token_layer
        for name in ("q", "k", "v"):
            layer = _token_layer(self.layer, dim, dim, bias=variant.qkv_bias)
            setattr(self, f"{name}_{self.layer}", layer)
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", LIF())
        self.statten = SpatioTemporalAttention(chunk_size if attention_mode == "STAtten" else 1)
        self.attn_lif = LIF(v_threshold=ATTENTION_V_THRESHOLD)
        setattr(self, f"proj_{self.layer}", _token_layer(self.layer, dim, dim))
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = LIF()

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layers = (getattr(self, f"{name}_{part}") for part in (self.layer, "bn", "lif"))
        return _layer_bn_lif(*layers, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.flatten(3) if x.dim() == 5 else x  # the ImageNet file's [T, B, D, Hg, Wg]
        channels_last = self.layer == "linear"
        q, k, v = (self._project(name, tokens) for name in ("q", "k", "v"))
        if channels_last:
            q, k, v = (s.transpose(-1, -2) for s in (q, k, v))
        q, k, v = (split_heads(s, self.num_heads) for s in (q, k, v))
        out = self.statten(q, k, v, self.scale)  # [T, B, heads, N, d]
        T, B, _, N, _ = out.shape
        if channels_last:
            out = out.transpose(2, 3).reshape(T, B, N, -1)
        else:
            out = out.transpose(3, 4).reshape(T, B, -1, N)
        out = self.attn_lif(out.contiguous())
        return self._project("proj", out).reshape(shape)


class SpikformerMLP(nn.Module):
    """``fc2_lif(fc2_bn(W_2 fc1_lif(fc1_bn(W_1 x))))`` per token (official ``MLP``)."""

    def __init__(self, dim: int, hidden_dim: int, layer: str) -> None:
        super().__init__()
        self.layer = "conv" if layer == "conv2d" else layer
        norm = nn.BatchNorm2d if layer == "conv2d" else nn.BatchNorm1d
        setattr(self, f"fc1_{self.layer}", _token_layer(layer, dim, hidden_dim))
        self.fc1_bn = norm(hidden_dim)
        self.fc1_lif = LIF()
        setattr(self, f"fc2_{self.layer}", _token_layer(layer, hidden_dim, dim))
        self.fc2_bn = norm(dim)
        self.fc2_lif = LIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in ("fc1", "fc2"):
            layers = (getattr(self, f"{fc}_{part}") for part in (self.layer, "bn", "lif"))
            x = _layer_bn_lif(*layers, x)
        return x


class SpikformerBlock(nn.Module):
    """``x + SSA(x)``, then ``x + MLP(x)``: plain additions of spikes (SEW "ADD" residual)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        variant: Variant,
        attention_mode: str,
        chunk_size: int,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = SpikingSelfAttention(dim, num_heads, variant, attention_mode, chunk_size)
        self.mlp = SpikformerMLP(dim, int(dim * mlp_ratio), variant.mlp_layer)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path_per_sample(self.attn(x), self.drop_path, self.training)
        return x + drop_path_per_sample(self.mlp(x), self.drop_path, self.training)


class Spikformer(SpikingModel):
    """Spikformer backbone with SSA (native) or STAtten attention and a linear head.

    Takes images ``[B, C, H, W]`` (repeated over ``T`` steps) or event frames
    ``[B, T, C, H, W]`` and returns logits ``[B, num_classes]``: the head sees the stream
    averaged over tokens and then over time. Every call starts from zero membrane potential.
    ``img_size`` and ``in_channels`` default to the variant's official values (32/3, 128/2,
    224/3). Unlike the official files, ``T`` is honoured by every variant (the ImageNet file
    hard-codes 4) and the DVS variant takes any size divisible by 16 (the file only 128).
    """

    family_name = "spikformer"

    def __init__(
        self,
        variant: str = "cifar10",
        img_size: int | None = None,
        in_channels: int | None = None,
        num_classes: int = 10,
        embed_dims: int = 384,
        num_heads: int = 12,
        depths: int = 4,
        mlp_ratio: float = 4.0,
        T: int = 4,
        chunk_size: int = 1,
        attention_mode: str = "SSA",
        drop_path_rate: float = 0.0,
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        check_config(locals())
        spec = self.spec = VARIANTS[variant]
        self.variant = variant
        self.img_size = spec.img_size if img_size is None else img_size
        self.in_channels = spec.in_channels if in_channels is None else in_channels
        self.num_classes = num_classes
        self.embed_dims = self.num_features = embed_dims
        self.T = T
        self.event_input = spec.event_input
        self.attention_mode = attention_mode
        self.patch_embed = SpikformerPatchEmbed(self.in_channels, embed_dims, spec.pooled_stages)
        drop_rates = torch.linspace(0, drop_path_rate, depths, device="cpu").tolist()
        self.block = nn.ModuleList(
            SpikformerBlock(
                embed_dims, num_heads, mlp_ratio, spec, attention_mode, chunk_size, rate
            )
            for rate in drop_rates
        )
        self.head = nn.Linear(embed_dims, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_trunc_normal)
        self.memory_efficient = memory_efficient

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` input -> token-averaged features ``[T, B, embed_dims]``."""
        x = self.patch_embed(x)  # [T, B, D, Hg, Wg]
        if self.spec.stream != "grid":
            x = x.flatten(-2)
        if self.spec.stream == "tokens_last":
            x = x.transpose(-1, -2)
        for blk in self.block:
            x = blk(x)
        return x.mean(2) if self.spec.stream == "tokens_last" else x.flatten(3).mean(3)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(0)
        return x if pre_logits else self.head(x)


def check_config(args: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for constructor arguments that do not make a Spikformer."""
    variant = args["variant"]
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown Spikformer variant {variant!r}; expected one of {list(VARIANTS)}"
        )
    check_common_config(args, ATTENTION_MODES, "spikformer")
    embed_dims = args["embed_dims"]
    if embed_dims % 8:
        raise ValueError(f"embed_dims={embed_dims} must be divisible by 8 (patch-embedding widths)")
    stride = VARIANTS[variant].patch_stride
    img_size = args["img_size"]
    if img_size is not None and (img_size < stride or img_size % stride):
        raise ValueError(
            f"img_size={img_size} must be a multiple of {stride} for the {variant} variant "
            f"(its patch embedding halves the image {len(VARIANTS[variant].pooled_stages)} times)"
        )


# Parameters the official files create and never use: the LayerNorms of every block, the DVS
# file's position embedding and final LayerNorm.
UNUSED_REFERENCE_KEYS = (".norm1.weight", ".norm1.bias", ".norm2.weight", ".norm2.bias")
UNUSED_REFERENCE_NAMES = ("pos_embed", "norm.weight", "norm.bias")


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Adapt an official (or DDP / ``torch.compile``) state_dict to :class:`Spikformer`.

    Strips ``module.`` / ``_orig_mod.`` prefixes and drops the never-used ``norm1``/``norm2``,
    ``pos_embed`` and ``norm`` parameters.
    """
    return filter_state_dict(state_dict, UNUSED_REFERENCE_KEYS, UNUSED_REFERENCE_NAMES)


default_cfgs = generate_default_cfgs({"spikformer.untrained": default_cfg()})


@register_model
def spikformer(pretrained: bool = False, **kwargs: Any) -> Spikformer:
    """Spikformer (``variant`` selects the official CIFAR, CIFAR10-DVS or ImageNet network)."""
    # ``variant`` is also timm's build_model_with_cfg's own argument (the default_cfg name).
    network = partial(Spikformer, variant=kwargs.pop("variant", "cifar10"))
    return build_model(network, "spikformer", pretrained, checkpoint_filter_fn, **kwargs)


def reference_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """Model keyword arguments equivalent to what an official training script built.

    The CIFAR script's ``args`` name the size (``dim``, ``layer``, ``num_heads``, ``mlp_ratio``,
    ``time_step``); the ImageNet script always builds the registered 8-512 model at T 4; the
    CIFAR10-DVS script the registered 2-256 model (16 heads, 128 px) with ``T`` steps. The
    configured drop path is left out: the official code never applied it.
    """
    dataset = str(args.get("dataset", "")).lower()
    if "dvs" in dataset:
        return {
            "variant": "cifar10dvs",
            "num_classes": int(args.get("num_classes", 10)),
            "embed_dims": 256,
            "num_heads": 16,
            "depths": 2,
            "T": int(args["T"]),
        }
    if "cifar" in dataset:
        return {
            "variant": "cifar10",
            "img_size": int(args["img_size"]),
            "num_classes": int(args["num_classes"]),
            "embed_dims": int(args["dim"]),
            "num_heads": int(args["num_heads"]),
            "depths": int(args["layer"]),
            "mlp_ratio": float(args.get("mlp_ratio", 4)),
            "T": int(args["time_step"]),
        }
    return {"variant": "imagenet", "num_classes": int(args.get("num_classes", 1000)),
            "embed_dims": 512, "num_heads": 8, "depths": 8}  # fmt: skip


FAMILY = register_family(
    ModelFamily(
        name="spikformer",
        model_class=Spikformer,
        attention_modes=ATTENTION_MODES,
        check_config=check_config,
        reference_kwargs=reference_kwargs,
        checkpoint_filter_fn=checkpoint_filter_fn,
        options=(
            FamilyOption(
                "variant",
                "spikformer: which official model file's network (default cifar10)",
                choices=tuple(VARIANTS),
            ),
        ),
    )
)
