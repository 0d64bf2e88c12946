"""Spike-driven Transformer v1 with STAtten or SDT attention: the reference's ``sdt`` model.

Activations are laid out time-first, ``[T, B, C, H, W]``. Module and parameter names follow the
reference code, so its state_dicts load unchanged once :func:`checkpoint_filter_fn` has dropped
the ``talking_heads`` weights that the reference creates but never uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from spikingjelly.activation_based.functional import seq_to_ann_forward
from timm.layers import drop_path, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from statten.attention import SpatioTemporalAttention, dvs_max_pool
from statten.fast.functions import max_pool
from statten.fast.storage import spike_storage, storing_spikes
from statten.neurons import LIF, check_spike_mode, create_neuron

__all__ = [
    "ATTENTION_MODES",
    "EncoderBlock",
    "SpikeDrivenTransformer",
    "SpikingMLP",
    "SpikingPatchEmbed",
    "SpikingSelfAttention",
    "checkpoint_filter_fn",
]

ATTENTION_MODES = ("STAtten", "SDT")
ATTENTION_V_THRESHOLD = 0.5  # attn_lif and talking_heads_lif fire at half the usual threshold
# Patch-embedding stages whose conv output a memory-efficient model recomputes in backward rather
# than stores: the cheap ones (few input channels). Attention and MLP 1x1 convs always recompute.
RECOMPUTED_STAGES = ("", "1")


def per_step(modules: nn.Module | Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply stateless layers to every time step of ``[T, B, ...]`` at once (T and B folded)."""
    return seq_to_ann_forward(x, modules if isinstance(modules, nn.Module) else list(modules))


def conv_bn_lif(
    conv: nn.Module,
    bn: nn.Module,
    lif: nn.Module,
    x: torch.Tensor,
    recompute: bool = False,
    pool: nn.MaxPool2d | None = None,
) -> torch.Tensor:
    """``lif(bn(conv(x)))`` with conv and BN per time step, then ``pool`` per step if given.

    A fused LIF runs them all as one layer.
    """
    if getattr(lif, "fused", False):
        return lif(x, conv_bn=(conv, bn), recompute=recompute, pool=pool)
    spikes = lif(per_step((conv, bn), x))
    return spikes if pool is None else per_step(pool, spikes)


def drop_path_per_sample(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a time-first tensor: drops whole samples (axis 1), all time steps."""
    if prob == 0.0 or not training:
        return x
    return drop_path(x.transpose(0, 1), prob, training).transpose(0, 1)


def check_pooling_stat(pooling_stat: str) -> str:
    """Return ``pooling_stat`` if it is four characters of "0"/"1", else raise ``ValueError``."""
    well_formed = isinstance(pooling_stat, str) and len(pooling_stat) == 4
    if not well_formed or set(pooling_stat) - {"0", "1"}:
        raise ValueError(
            f"malformed pooling_stat {pooling_stat!r}: expected 4 characters of '0'/'1', "
            "one per patch-embedding stage (e.g. '0011' for CIFAR, '1111' for ImageNet)"
        )
    return pooling_stat


class SpikingPatchEmbed(nn.Module):
    """Convolutional spiking patch embedding (reference ``MS_SPS``) with a membrane shortcut.

    Four 3x3 conv + BN stages with ``D/8, D/4, D/2, D`` channels, LIF after the first three,
    each optionally followed by a stride-2 max pool (``pooling_stat``), then a relative position
    embedding ``BN(conv(LIF(x)))`` added to the stage-4 membrane.
    """

    def __init__(self, in_channels: int, embed_dims: int, pooling_stat: str) -> None:
        super().__init__()
        self.pool_after_stage = [bit == "1" for bit in check_pooling_stat(pooling_stat)]
        widths = [in_channels, embed_dims // 8, embed_dims // 4, embed_dims // 2, embed_dims]
        for stage, suffix in enumerate(("", "1", "2", "3")):
            conv = nn.Conv2d(widths[stage], widths[stage + 1], 3, padding=1, bias=False)
            setattr(self, f"proj_conv{suffix}", conv)
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm2d(widths[stage + 1]))
            setattr(self, f"proj_lif{suffix}", LIF())
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.rpe_conv = nn.Conv2d(embed_dims, embed_dims, 3, padding=1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dims)

    def _stage(self, suffix: str, pool: bool, x: torch.Tensor) -> torch.Tensor:
        conv, bn = getattr(self, f"proj_conv{suffix}"), getattr(self, f"proj_bn{suffix}")
        if suffix == "3":  # the last stage ends on membrane potentials (no LIF)
            x = per_step((conv, bn), x)
            return self._pool(x) if pool else x
        lif = getattr(self, f"proj_lif{suffix}")
        recompute = suffix in RECOMPUTED_STAGES
        if pool and storing_spikes():  # memory-efficient training: pooled inside the fused layer
            return conv_bn_lif(conv, bn, lif, x, recompute, self.maxpool)
        x = conv_bn_lif(conv, bn, lif, x, recompute)
        return per_step(self.maxpool, x) if pool else x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Max pool per step, keeping int32 argmaxes for backward in a memory-efficient forward."""
        if storing_spikes():
            return max_pool(self.maxpool, x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return per_step(self.maxpool, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for suffix, pool in zip(("", "1", "2", "3"), self.pool_after_stage, strict=True):
            x = self._stage(suffix, pool, x)
        return x + per_step((self.rpe_conv, self.rpe_bn), self.proj_lif3(x))


class SpikingSelfAttention(nn.Module):
    """Spiking self-attention (reference ``MS_SSA_Conv``), returning the residual branch.

    Q, K, V come from 1x1 conv + BN + LIF on the spikes of the input. ``"STAtten"`` mixes tokens
    with :class:`~statten.attention.SpatioTemporalAttention` followed by ``attn_lif``; ``"SDT"``
    uses the spike-driven attention of Spike-driven Transformer v1
    (``Q * LIF(sum_N K * V)``). A 1x1 conv + BN projects the result.
    """

    def __init__(
        self, dim: int, num_heads: int, attention_mode: str, chunk_size: int, dvs: bool
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_mode = attention_mode
        self.chunk_size = chunk_size
        self.dvs = dvs
        self.shortcut_lif = LIF()
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_conv", nn.Conv2d(dim, dim, 1, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm2d(dim))
            setattr(self, f"{name}_lif", LIF())
        if attention_mode == "STAtten":
            self.statten = SpatioTemporalAttention(chunk_size)
            self.attn_lif = LIF(v_threshold=ATTENTION_V_THRESHOLD)
        else:
            self.talking_heads_lif = LIF(v_threshold=ATTENTION_V_THRESHOLD)
        self.proj_conv = nn.Conv2d(dim, dim, 1)
        self.proj_bn = nn.BatchNorm2d(dim)

    def _heads(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Q, K or V spikes ``[T, B, heads, N, d]`` (channel ``head * d + j``)."""
        layers = (getattr(self, f"{name}_conv"), getattr(self, f"{name}_bn"))
        s = conv_bn_lif(*layers, getattr(self, f"{name}_lif"), x, recompute=True)
        if self.dvs:
            s = dvs_max_pool(s)
        T, B, C, H, W = s.shape
        return s.view(T, B, self.num_heads, C // self.num_heads, H * W).transpose(-1, -2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, heads, N, d]`` -> ``[T, B, heads * d, N]``."""
        T, B, _, N, _ = x.shape
        return x.transpose(-1, -2).reshape(T, B, -1, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.shortcut_lif(x)
        q, k, v = (self._heads(name, x) for name in ("q", "k", "v"))
        if self.attention_mode == "STAtten":
            scale = 1.0 / (H * H * self.chunk_size) if self.dvs else 1.0 / H
            out = self.attn_lif(self._merge_heads(self.statten(q, k, v, scale)))
            out = out.view(T, B, C, H, W)
            if self.dvs:
                x_pool = dvs_max_pool(x)
                out = out * x_pool + x_pool
        else:
            kv = k * v
            if self.dvs:
                kv = dvs_max_pool(kv)
            out = q * self.talking_heads_lif(kv.sum(dim=-2, keepdim=True))
            if self.dvs:
                out = dvs_max_pool(out)
            out = self._merge_heads(out).view(T, B, C, H, W)
        return per_step((self.proj_conv, self.proj_bn), out)


class SpikingMLP(nn.Module):
    """Spiking MLP (reference ``MS_MLP_Conv``): two 1x1 conv + BN layers fed by spikes.

    Returns the residual branch. When the hidden width equals the input width, the reference adds
    an inner shortcut around the first layer; that case is reproduced.
    """

    def __init__(self, dim: int, hidden_dim: int, spike_mode: str) -> None:
        super().__init__()
        self.inner_shortcut = hidden_dim == dim
        self.fc1_lif = create_neuron(spike_mode)
        self.fc1_conv = nn.Conv2d(dim, hidden_dim, 1)
        self.fc1_bn = nn.BatchNorm2d(hidden_dim)
        self.fc2_lif = create_neuron(spike_mode)
        self.fc2_conv = nn.Conv2d(hidden_dim, dim, 1)
        self.fc2_bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner_shortcut:
            hidden = per_step((self.fc1_conv, self.fc1_bn), self.fc1_lif(x))
            x = x + hidden
            return hidden + per_step((self.fc2_conv, self.fc2_bn), self.fc2_lif(x))
        spikes = conv_bn_lif(self.fc1_conv, self.fc1_bn, self.fc2_lif, self.fc1_lif(x), True)
        return per_step((self.fc2_conv, self.fc2_bn), spikes)


class EncoderBlock(nn.Module):
    """Encoder block (reference ``MS_Block_Conv``): ``x + attn(x)``, then ``x + mlp(x)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        attention_mode: str,
        chunk_size: int,
        spike_mode: str,
        dvs: bool,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = SpikingSelfAttention(dim, num_heads, attention_mode, chunk_size, dvs)
        self.mlp = SpikingMLP(dim, int(dim * mlp_ratio), spike_mode)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path_per_sample(self.attn(x), self.drop_path, self.training)
        return x + drop_path_per_sample(self.mlp(x), self.drop_path, self.training)


class SpikeDrivenTransformer(nn.Module):
    """Spike-driven Transformer v1 backbone with STAtten (or SDT) attention and a linear head.

    Takes images ``[B, C, H, W]`` (repeated over ``T`` steps, direct encoding) or event frames
    ``[B, T, C, H, W]`` and returns logits ``[B, num_classes]`` (time-averaged), or
    ``[T, B, num_classes]`` when ``TET`` is set. Every call starts from zero membrane potential.

    With ``memory_efficient=True`` the LIF layers run the fused kernels of :mod:`statten.fast`
    (conv + BatchNorm + LIF as one layer that recomputes instead of storing) and spikes are kept
    as 1-byte tensors for backward: bit-identical outputs and gradients, about a quarter of what
    is stored for backward (docs/performance.md).
    """

    def __init__(
        self,
        img_size: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        embed_dims: int = 512,
        num_heads: int = 8,
        depths: int = 2,
        mlp_ratio: float = 4.0,
        T: int = 4,
        chunk_size: int = 2,
        pooling_stat: str = "0011",
        attention_mode: str = "STAtten",
        spike_mode: str = "lif",
        dvs_mode: bool = False,
        TET: bool = False,
        drop_path_rate: float = 0.0,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        _check_config(embed_dims, num_heads, T, chunk_size, attention_mode)
        check_spike_mode(spike_mode)
        self.img_size = img_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.embed_dims = self.num_features = embed_dims
        self.T = T
        self.TET = TET
        self.dvs_mode = dvs_mode
        self.patch_embed = SpikingPatchEmbed(in_channels, embed_dims, pooling_stat)
        drop_rates = torch.linspace(0, drop_path_rate, depths, device="cpu").tolist()
        self.block = nn.ModuleList(
            EncoderBlock(
                embed_dims,
                num_heads,
                mlp_ratio,
                attention_mode,
                chunk_size,
                spike_mode,
                dvs_mode,
                rate,
            )
            for rate in drop_rates
        )
        self.head_lif = create_neuron(spike_mode)
        self.head = nn.Linear(embed_dims, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self.memory_efficient = memory_efficient

    @property
    def memory_efficient(self) -> bool:
        """Fused LIF layers and 1-byte spikes for backward (see the class docstring)."""
        return self._memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, enabled: bool) -> None:
        self._memory_efficient = bool(enabled)
        for module in self.modules():
            if isinstance(module, LIF):
                module.fused = self._memory_efficient

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (timm convention), e.g. for fine-tuning or linear probing."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dims, num_classes) if num_classes > 0 else nn.Identity()

    def time_major(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input and lay it out as ``[T, B, C, H, W]``."""
        if x.dim() == 4:
            channels = x.shape[1]
        elif x.dim() == 5:
            channels = x.shape[2]
            if x.shape[1] != self.T:
                raise ValueError(
                    f"event input has {x.shape[1]} time steps (shape {tuple(x.shape)}), "
                    f"but the model was built with T={self.T}"
                )
        else:
            raise ValueError(
                f"expected images [B, C, H, W] or event frames [B, T, C, H, W], got a "
                f"{x.dim()}-D input of shape {tuple(x.shape)}"
            )
        if channels != self.in_channels:
            raise ValueError(
                f"input has {channels} channels (shape {tuple(x.shape)}), "
                f"but the model expects in_channels={self.in_channels}"
            )
        if x.dim() == 4:
            return x.unsqueeze(0).expand(self.T, *x.shape)
        return x.transpose(0, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` input -> token-averaged features ``[T, B, embed_dims]``."""
        x = self.patch_embed(x)
        for blk in self.block:
            x = blk(x)
        return x.flatten(3).mean(3)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_lif(x)
        if pre_logits:
            return x
        x = self.head(x)
        return x if self.TET else x.mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compact = self.memory_efficient and torch.is_grad_enabled()
        with spike_storage(compact and not torch.compiler.is_compiling()):
            return self.forward_head(self.forward_features(self.time_major(x)))


def _check_config(
    embed_dims: int, num_heads: int, T: int, chunk_size: int, attention_mode: str
) -> None:
    if attention_mode not in ATTENTION_MODES:
        raise ValueError(
            f"unknown attention_mode {attention_mode!r}; expected one of {ATTENTION_MODES}"
        )
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if num_heads < 1 or embed_dims % num_heads:
        raise ValueError(f"embed_dims={embed_dims} is not divisible by num_heads={num_heads}")
    if attention_mode == "STAtten" and (
        not isinstance(chunk_size, int) or chunk_size < 1 or T % chunk_size
    ):
        raise ValueError(
            f"T={T} is not divisible by chunk_size={chunk_size}: STAtten attends within blocks "
            "of chunk_size consecutive time steps"
        )


def _init_weights(module: nn.Module) -> None:
    """Reference initialisation: conv weights trunc-normal(0.02), BN to identity."""
    if isinstance(module, nn.Conv2d):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


UNUSED_REFERENCE_KEYS = (".attn.talking_heads.weight",)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Adapt a reference (or DDP / ``torch.compile``) state_dict to :class:`SpikeDrivenTransformer`.

    Strips ``module.`` / ``_orig_mod.`` prefixes and drops the reference's never-used
    ``block.{i}.attn.talking_heads.weight``.
    """
    out = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if not key.endswith(UNUSED_REFERENCE_KEYS):
            out[key] = value
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "first_conv": "patch_embed.proj_conv",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"sdt.untrained": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> SpikeDrivenTransformer:
    # timm's generic ``in_chans`` is this model's ``in_channels``; timm also injects a default.
    if "in_chans" in kwargs:
        kwargs.setdefault("in_channels", kwargs.pop("in_chans"))
    return build_model_with_cfg(
        SpikeDrivenTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        kwargs_filter=("in_chans",),
        **kwargs,
    )


@register_model
def sdt(pretrained: bool = False, **kwargs: Any) -> SpikeDrivenTransformer:
    """Spike-driven Transformer v1 with STAtten attention by default (reference name ``sdt``)."""
    return _create("sdt", pretrained, **kwargs)


MODEL_FACTORIES: dict[str, Callable[..., SpikeDrivenTransformer]] = {"sdt": sdt}
