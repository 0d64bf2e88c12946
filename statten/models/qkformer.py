"""QKFormer (Zhou et al., NeurIPS 2024): a hierarchical spiking transformer with Q-K token
attention stages and spiking self-attention (SSA) stages, with SSA's product or STAtten.

Numerically identical to the official code (``variant``: ``"cifar"`` for the CIFAR-10/100 files,
``"dvs"`` for the CIFAR10-DVS / DVS128 Gesture files, ``"imagenet"`` for the hierarchical ImageNet
file; ``../shared/reference/qkformer/SPEC.md``), including its ``proj_lif`` quirk (official issue
#14): the SSA's ``proj_lif`` runs its membrane over time and batch flattened, so a sample's output
depends on the other samples of its batch. That is what the published models were trained and
evaluated with, so it is the default; ``proj_lif_per_sample=True`` gives the corrected
computation. Module and parameter names are the official ones, so official state_dicts load as
they are.

The Q-K token attention (``tssa``) has no V and no ``Q K^T V`` product: it stays as it is with
STAtten. STAtten replaces only the SSA stages' product, which runs through
:class:`~statten.attention.SpatioTemporalAttention` in both modes (SSA is its ``chunk_size=1``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from statten.analysis.ops import Counts, OpRecorder, is_spike_count, per_step_sum
from statten.attention import SpatioTemporalAttention
from statten.layers import (
    ATTENTION_V_THRESHOLD,
    conv_bn_lif,
    conv_bn_pool_lif,
    drop_path_per_sample,
    init_linear_trunc_normal,
    merge_heads,
    mlp_conv_bn_lif,
    per_step,
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
    "BatchChainedLIF",
    "QKFormer",
    "QKFormerMLP",
    "SpikingPatchEmbedding",
    "SpikingSelfAttention",
    "TokenQKAttention",
    "checkpoint_filter_fn",
]

ATTENTION_MODES = ("SSA", "STAtten")
SSA_SCALE = 0.125  # the official constant, whatever the head width


@dataclass(frozen=True)
class Unit:
    """A patch-embedding convolution: 3x3 conv, BatchNorm, optional max pool, LIF.

    ``name`` prefixes its modules (``<name>_conv``, ``<name>_bn``, ``<name>_lif``); widths are
    fractions of ``embed_dims`` (``0`` for the input channels); ``pool`` halves the grid between
    the BatchNorm and the neuron.
    """

    name: str
    width_in: float
    width_out: float
    pool: bool = False


@dataclass(frozen=True)
class Embedding:
    """A patch embedding: a chain of :class:`Unit` plus a 1x1 residual ``proj_res`` (conv with
    ``stride``, BN, LIF) from the chain's output number ``tap`` (0: the embedding's input)."""

    units: tuple[Unit, ...]
    tap: int
    stride: int

    @property
    def width_out(self) -> float:
        return self.units[-1].width_out


def _stage(width_in: float, width: float, first: str, pool_first: bool) -> Embedding:
    """The embedding in front of a later stage: two 3x3 units (one pooled) and a stride-2
    residual from the input."""
    units = (
        Unit(first, width_in, width, pool=pool_first),
        Unit("proj4", width, width, pool=not pool_first),
    )
    return Embedding(units, tap=0, stride=2)


@dataclass(frozen=True)
class Variant:
    """One official network (SPEC sections 3.5 and 3.6).

    ``embeddings[i]`` precedes stage ``i + 1``; ``qkta_blocks[i]`` is the number of Q-K token
    attention blocks of stage ``i + 1`` (every stage but the last); the last stage has
    ``depths - sum(qkta_blocks)`` SSA blocks. ``ssa_name`` / ``mlp_names`` are the official
    attribute names. ``img_size``, ``in_channels`` and ``event_input``: the official input.
    """

    embeddings: tuple[Embedding, ...]
    qkta_blocks: tuple[int, ...]
    ssa_name: str
    mlp_names: tuple[str, str]
    img_size: int
    in_channels: int
    event_input: bool = False

    @property
    def downsampling(self) -> int:
        pools = sum(unit.pool for e in self.embeddings for unit in e.units)
        return 2**pools


VARIANTS = {
    "cifar": Variant(
        embeddings=(
            Embedding((Unit("proj", 0, 1 / 8), Unit("proj1", 1 / 8, 1 / 4)), tap=1, stride=1),
            _stage(1 / 4, 1 / 2, "proj3", pool_first=False),
            _stage(1 / 2, 1, "proj3", pool_first=False),
        ),
        qkta_blocks=(1, 1),
        ssa_name="ssa",
        mlp_names=("mlp1", "mlp2"),
        img_size=32,
        in_channels=3,
    ),
    "dvs": Variant(
        embeddings=(
            Embedding(
                (
                    Unit("proj", 0, 1 / 16),
                    Unit("proj1", 1 / 16, 1 / 8, pool=True),
                    Unit("proj2", 1 / 8, 1 / 4, pool=True),
                    Unit("proj3", 1 / 4, 1 / 2, pool=True),
                ),
                tap=2,
                stride=4,
            ),
            _stage(1 / 2, 1, "proj", pool_first=False),
        ),
        qkta_blocks=(1,),
        ssa_name="ssa",
        mlp_names=("mlp1", "mlp2"),
        img_size=128,
        in_channels=2,
        event_input=True,
    ),
    "imagenet": Variant(
        embeddings=(
            Embedding(
                (
                    Unit("proj", 0, 1 / 8, pool=True),
                    Unit("proj1", 1 / 8, 1 / 4, pool=True),
                    Unit("proj2", 1 / 4, 1 / 4),
                ),
                tap=1,
                stride=2,
            ),
            _stage(1 / 4, 1 / 2, "proj3", pool_first=True),
            _stage(1 / 2, 1, "proj3", pool_first=True),
        ),
        qkta_blocks=(1, 2),
        ssa_name="attn",
        mlp_names=("fc1", "fc2"),
        img_size=224,
        in_channels=3,
    ),
}


class BatchChainedLIF(LIF):
    """The official SSA ``proj_lif``: with ``chained`` (the default of the official code), its
    membrane runs over time and batch flattened time-major, ``[T, B, ...] -> [T * B, ...]``, so
    sample ``b`` at step ``t`` starts from the membrane sample ``b - 1`` left (official issue #14).
    Without ``chained`` it is an ordinary LIF over time, independently per sample.

    Input and output are ``[T, B, ...]`` either way, so spike recorders see per-step spikes. It
    takes the neuron's input (not a conv and BatchNorm to fuse, see :class:`~statten.neurons.LIF`).
    """

    def __init__(self, chained: bool = True) -> None:
        super().__init__()
        self.chained = chained

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if not self.chained:
            return super().multi_step_forward(x_seq)
        return super().multi_step_forward(x_seq.flatten(0, 1)).view(x_seq.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chained={self.chained}"


class SpikingPatchEmbedding(nn.Module):
    """A patch embedding (official ``PatchEmbedInit`` / ``PatchEmbeddingStage`` and their DVS and
    ImageNet forms): the chain of units, plus the 1x1 residual branch. Output values 0, 1, 2."""

    def __init__(self, spec: Embedding, embed_dims: int, in_channels: int) -> None:
        super().__init__()
        self.units = [unit.name for unit in spec.units]
        self.pooled = {unit.name for unit in spec.units if unit.pool}
        self.tap = spec.tap

        def width(fraction: float) -> int:
            return in_channels if fraction == 0 else int(embed_dims * fraction)

        for unit in spec.units:
            conv = nn.Conv2d(width(unit.width_in), width(unit.width_out), 3, padding=1, bias=False)
            setattr(self, f"{unit.name}_conv", conv)
            setattr(self, f"{unit.name}_bn", nn.BatchNorm2d(width(unit.width_out)))
            if unit.pool:
                setattr(self, f"{unit.name}_maxpool", nn.MaxPool2d(3, stride=2, padding=1))
            setattr(self, f"{unit.name}_lif", LIF())
        tap_width = spec.units[spec.tap - 1].width_out if spec.tap else spec.units[0].width_in
        res_in, res_out = width(tap_width), width(spec.width_out)
        self.proj_res_conv = nn.Conv2d(res_in, res_out, 1, stride=spec.stride, bias=False)
        self.proj_res_bn = nn.BatchNorm2d(res_out)
        self.proj_res_lif = LIF()

    def _unit(self, name: str, x: torch.Tensor) -> torch.Tensor:
        conv, bn, lif = (getattr(self, f"{name}_{part}") for part in ("conv", "bn", "lif"))
        if name in self.pooled:  # pooled between the BatchNorm and the neuron
            return conv_bn_pool_lif(conv, bn, getattr(self, f"{name}_maxpool"), lif, x)
        return conv_bn_lif(conv, bn, lif, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for name in self.units:
            outputs.append(self._unit(name, outputs[-1]))
        residual = conv_bn_lif(self.proj_res_conv, self.proj_res_bn, self.proj_res_lif,
                               outputs[self.tap])  # fmt: skip
        return outputs[-1] + residual


def _conv1d_bn(dim: int, bias: bool = False) -> tuple[nn.Conv1d, nn.BatchNorm1d]:
    return nn.Conv1d(dim, dim, kernel_size=1, bias=bias), nn.BatchNorm1d(dim)


class TokenQKAttention(nn.Module):
    """Q-K token attention (official ``Token_QK_Attention``), returning the residual branch.

    ``Q, K = LIF(BN(conv1x1(x)))``; a token of a head passes when any of its Q channels spiked
    (``attn_lif`` on the per-head channel sum of Q); ``proj_lif(proj_bn(proj_conv(mask * K)))``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_conv, self.q_bn = _conv1d_bn(dim)
        self.q_lif = LIF()
        self.k_conv, self.k_bn = _conv1d_bn(dim)
        self.k_lif = LIF()
        self.attn_lif = LIF(v_threshold=ATTENTION_V_THRESHOLD)
        self.proj_conv, self.proj_bn = _conv1d_bn(dim, bias=True)
        self.proj_lif = LIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(3)  # [T, B, C, N]
        q = conv_bn_lif(self.q_conv, self.q_bn, self.q_lif, tokens, recompute=True)
        k = conv_bn_lif(self.k_conv, self.k_bn, self.k_lif, tokens, recompute=True)
        T, B, C, N = q.shape
        heads = (T, B, self.num_heads, C // self.num_heads, N)
        mask = self.attn_lif(q.view(heads).sum(dim=3, keepdim=True))  # [T, B, heads, 1, N]
        y = (k.view(heads) * mask).reshape(T, B, C, N)  # in k's layout: a view
        out = conv_bn_lif(self.proj_conv, self.proj_bn, self.proj_lif, y, recompute=True)
        return out.view(x.shape)

    def register_op_counting(self, recorder: OpRecorder, name: str) -> None:
        """Count the token mask's channel sum of Q and its product with K in ``recorder``
        (its convolutions are counted as every convolution is)."""
        seen: dict[str, Tensor] = {}

        def keep(neuron: str) -> Callable:
            def record(module: nn.Module, inputs: tuple, out: Tensor) -> None:
                seen[neuron] = out.detach()

            return record

        def count(module: nn.Module, inputs: tuple) -> None:
            mix = qk_token_counts(seen["q_lif"], seen["k_lif"], seen["attn_lif"])
            recorder.add_products(name, mix)
            seen.clear()

        for neuron in ("q_lif", "k_lif", "attn_lif"):
            recorder.hook(getattr(self, neuron), keep(neuron))
        recorder.hook(self.proj_conv, count, pre=True)


def qk_token_counts(q: Tensor, k: Tensor, mask: Tensor) -> Counts:
    """Counts of the Q-K token attention's mix for ``q, k`` spikes ``[T, B, C, N]`` and the token
    mask ``[T, B, heads, 1, N]`` (docs/profile.md): the per-head channel sum of Q costs one MAC
    per summed element and one SOP per summed spike; ``mask * K`` one MAC per element of K and
    one SOP per pair of coinciding spikes."""
    T, B, C, N = k.shape
    step_macs = torch.full((T,), k[0].numel(), dtype=torch.float64)
    heads = mask.shape[2]
    pairs = per_step_sum(mask * k.reshape(T, B, heads, C // heads, N), T)
    return {
        "sum_d q": ("sum", step_macs, per_step_sum(q, T), is_spike_count(q)),
        "mask * k": ("mul", step_macs.clone(), pairs, is_spike_count(mask) and is_spike_count(k)),
    }


class SpikingSelfAttention(nn.Module):
    """QKFormer's SSA (official ``Spiking_Self_Attention``), or STAtten in its place.

    ``attn_lif(0.125 * Q (K^T V))`` per step (``chunk_size = 1``) or over blocks of
    ``chunk_size`` steps, then ``proj_lif(proj_bn(proj_conv(.)))`` with the official batch-chained
    ``proj_lif`` unless ``proj_lif_per_sample``. Returns the residual branch.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention_mode: str,
        chunk_size: int,
        proj_lif_per_sample: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        for name in ("q", "k", "v"):
            conv, bn = _conv1d_bn(dim)
            setattr(self, f"{name}_conv", conv)
            setattr(self, f"{name}_bn", bn)
            setattr(self, f"{name}_lif", LIF())
        self.statten = SpatioTemporalAttention(chunk_size if attention_mode == "STAtten" else 1)
        self.attn_lif = LIF(v_threshold=ATTENTION_V_THRESHOLD)
        self.proj_conv, self.proj_bn = _conv1d_bn(dim, bias=True)
        self.proj_lif = BatchChainedLIF(chained=not proj_lif_per_sample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(3)  # [T, B, C, N]
        q, k, v = (
            conv_bn_lif(*(getattr(self, f"{n}_{p}") for p in ("conv", "bn", "lif")), tokens,
                        recompute=True)
            for n in ("q", "k", "v")
        )  # fmt: skip
        q, k, v = (split_heads(s, self.num_heads) for s in (q, k, v))
        out = self.attn_lif(merge_heads(self.statten(q, k, v, SSA_SCALE)))
        # Not conv_bn_lif: a batch-chained neuron needs the BatchNorm output, not the conv input.
        out = self.proj_lif(per_step((self.proj_conv, self.proj_bn), out))
        return out.view(x.shape)


class QKFormerMLP(nn.Module):
    """Two 1x1 Conv2d + BN2d + LIF layers on the token grid (official ``MLP``)."""

    def __init__(self, dim: int, hidden_dim: int, names: tuple[str, str]) -> None:
        super().__init__()
        self.names = names
        for name, (c_in, c_out) in zip(names, ((dim, hidden_dim), (hidden_dim, dim)), strict=True):
            setattr(self, f"{name}_conv", nn.Conv2d(c_in, c_out, 1))
            setattr(self, f"{name}_bn", nn.BatchNorm2d(c_out))
            setattr(self, f"{name}_lif", LIF())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (
            tuple(getattr(self, f"{name}_{part}") for part in ("conv", "bn", "lif"))
            for name in self.names
        )
        return mlp_conv_bn_lif(first, second, x, recompute=True)


class QKFormerBlock(nn.Module):
    """``x + attention(x)``, then ``x + mlp(x)`` (official ``TokenSpikingTransformer`` with
    ``tssa``, or ``SpikingTransformer`` with ``ssa`` / ``attn``)."""

    def __init__(
        self,
        attn_name: str,
        attention: nn.Module,
        mlp: QKFormerMLP,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_name = attn_name
        setattr(self, attn_name, attention)
        self.mlp = mlp
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = getattr(self, self.attn_name)
        x = x + drop_path_per_sample(attention(x), self.drop_path, self.training)
        return x + drop_path_per_sample(self.mlp(x), self.drop_path, self.training)


class QKFormer(SpikingModel):
    """QKFormer: patch embeddings and stages of Q-K token attention blocks, then SSA (or
    STAtten) blocks at full width, and a linear head on the token and time average.

    Takes images ``[B, C, H, W]`` (repeated over ``T`` steps) or event frames ``[B, T, C, H, W]``
    and returns logits ``[B, num_classes]``. ``depths`` counts all blocks (the SSA blocks are
    ``depths`` minus the Q-K blocks: 2 in the CIFAR variant, 1 in the DVS one, 3 in the ImageNet
    one). Unlike the official files, every variant honours ``num_heads`` (the CIFAR and DVS files
    hard-code 8 and 16), ``depths`` (the DVS file always builds 2 blocks) and ``T``.
    """

    family_name = "qkformer"

    def __init__(
        self,
        variant: str = "cifar",
        img_size: int | None = None,
        in_channels: int | None = None,
        num_classes: int = 10,
        embed_dims: int = 384,
        num_heads: int = 8,
        depths: int = 4,
        mlp_ratio: float = 4.0,
        T: int = 4,
        chunk_size: int = 1,
        attention_mode: str = "SSA",
        drop_path_rate: float = 0.0,
        proj_lif_per_sample: bool = False,
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        check_config(locals())
        spec = VARIANTS[variant]
        self.variant = variant
        self.img_size = spec.img_size if img_size is None else img_size
        self.in_channels = spec.in_channels if in_channels is None else in_channels
        self.num_classes = num_classes
        self.embed_dims = self.num_features = embed_dims
        self.T = T
        self.event_input = spec.event_input
        blocks_per_stage = (*spec.qkta_blocks, depths - sum(spec.qkta_blocks))
        drop_rates = iter(torch.linspace(0, drop_path_rate, depths, device="cpu").tolist())
        channels = self.in_channels
        for stage, (embedding, blocks) in enumerate(
            zip(spec.embeddings, blocks_per_stage, strict=True), start=1
        ):
            setattr(self, f"patch_embed{stage}", SpikingPatchEmbedding(embedding, embed_dims,
                                                                       channels))  # fmt: skip
            dim = channels = int(embed_dims * embedding.width_out)
            last = stage == len(spec.embeddings)

            def block(dim: int = dim, last: bool = last) -> QKFormerBlock:
                mlp = QKFormerMLP(dim, int(dim * mlp_ratio), spec.mlp_names)
                if not last:
                    return QKFormerBlock("tssa", TokenQKAttention(dim, num_heads), mlp,
                                         next(drop_rates))  # fmt: skip
                attention = SpikingSelfAttention(
                    dim, num_heads, attention_mode, chunk_size, proj_lif_per_sample
                )
                return QKFormerBlock(spec.ssa_name, attention, mlp, next(drop_rates))

            setattr(self, f"stage{stage}", nn.ModuleList(block() for _ in range(blocks)))
        self.num_stages = len(spec.embeddings)
        self.head = nn.Linear(embed_dims, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_trunc_normal)
        self.memory_efficient = memory_efficient

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` input -> token-averaged features ``[T, B, embed_dims]``."""
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"patch_embed{stage}")(x)
            for blk in getattr(self, f"stage{stage}"):
                x = blk(x)
        return x.flatten(3).mean(3)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(0)
        return x if pre_logits else self.head(x)


def check_config(args: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for constructor arguments that do not make a QKFormer."""
    variant = args["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"unknown QKFormer variant {variant!r}; expected one of {list(VARIANTS)}")
    check_common_config(args, ATTENTION_MODES, "qkformer")
    spec = VARIANTS[variant]
    embed_dims, num_heads = args["embed_dims"], args["num_heads"]
    widths = [embed_dims * u.width_out for e in spec.embeddings for u in e.units]
    stage_dims = [embed_dims * e.width_out for e in spec.embeddings]
    if any(w != int(w) for w in widths) or any(int(d) % num_heads for d in stage_dims):
        raise ValueError(
            f"embed_dims={embed_dims} does not split into the {variant} variant's widths "
            f"{[int(w) if w == int(w) else w for w in widths]} with num_heads={num_heads} "
            "dividing every stage's width"
        )
    qkta = sum(spec.qkta_blocks)
    if args["depths"] <= qkta:
        raise ValueError(
            f"depths={args['depths']} leaves no SSA block: the {variant} variant has {qkta} Q-K "
            f"attention block(s) before its SSA stage (depths counts all blocks)"
        )
    img_size, stride = args["img_size"], spec.downsampling
    if img_size is not None and (img_size < stride or img_size % stride):
        raise ValueError(
            f"img_size={img_size} must be a multiple of {stride} for the {variant} variant"
        )


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Adapt an official (or DDP / ``torch.compile``) state_dict: strips wrapper prefixes (the
    official QKFormer files have no never-used parameters)."""
    return filter_state_dict(state_dict, ())


default_cfgs = generate_default_cfgs({"qkformer.untrained": default_cfg()})


@register_model
def qkformer(pretrained: bool = False, **kwargs: Any) -> QKFormer:
    """QKFormer (``variant`` selects the official CIFAR, DVS or ImageNet network)."""
    # ``variant`` is also timm's build_model_with_cfg's own argument (the default_cfg name).
    network = partial(QKFormer, variant=kwargs.pop("variant", "cifar"))
    return build_model(network, "qkformer", pretrained, checkpoint_filter_fn, **kwargs)


# The official classes, as the official checkpoints' ``arch`` names them.
REFERENCE_ARCHS = ("spiking_transformer", "vit_snn", "hierarchical_spiking_transformer")


def reference_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """Model keyword arguments equivalent to what an official training script built.

    The CIFAR scripts' ``args`` name the size (``dim``, ``layer``, ``mlp_ratio``, ``time_step``;
    8 heads, hard-coded); the DVS scripts build the registered HST-2-256 (16 heads; mlp ratio 1
    for CIFAR10-DVS, 4 with 11 classes for DVS128 Gesture) with ``T`` steps; the ImageNet script
    names its model (``QKFormer_10_384`` / ``_512`` / ``_768``). The official code applies no
    drop path, with or without the configured rate.
    """
    dataset = str(args.get("dataset", "")).lower()
    if "dvs" in dataset:
        classes = int(args.get("num_classes", 10))
        return {
            "variant": "dvs",
            "num_classes": classes,
            "embed_dims": 256,
            "num_heads": 16,
            "depths": 2,
            "mlp_ratio": 4.0 if classes == 11 else 1.0,
            "T": int(args["T"]),
        }
    if "cifar" in dataset:
        return {
            "variant": "cifar",
            "img_size": int(args["img_size"]),
            "num_classes": int(args["num_classes"]),
            "embed_dims": int(args["dim"]),
            "num_heads": 8,
            "depths": int(args["layer"]),
            "mlp_ratio": float(args.get("mlp_ratio", 4)),
            "T": int(args["time_step"]),
        }
    dims = int(str(args["model"]).rsplit("_", 1)[-1])
    return {"variant": "imagenet", "num_classes": int(args.get("nb_classes", 1000)),
            "embed_dims": dims, "num_heads": dims // 64, "depths": 10}  # fmt: skip


FAMILY = register_family(
    ModelFamily(
        name="qkformer",
        model_class=QKFormer,
        attention_modes=ATTENTION_MODES,
        check_config=check_config,
        reference_kwargs=reference_kwargs,
        checkpoint_filter_fn=checkpoint_filter_fn,
        reference_archs=REFERENCE_ARCHS,
        options=(
            FamilyOption(
                "variant",
                "qkformer: which official network (cifar, dvs, imagenet; default cifar)",
                choices=tuple(VARIANTS),
            ),
            FamilyOption(
                "proj_lif_per_sample",
                "qkformer: run the SSA proj_lif per sample, not over the batch as the official "
                "code does (outputs then no longer depend on the rest of the batch)",
                flag=True,
            ),
        ),
    )
)
