"""Model construction, input handling, modes and errors of the Spike-driven Transformer."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
from conftest import DATA, golden_model_config

import statten

TINY = {"img_size": 16, "embed_dims": 32, "num_heads": 4, "depths": 1, "num_classes": 5}


def tiny(**overrides) -> torch.nn.Module:
    return statten.create_model("sdt", **{**TINY, **overrides})


def reference_parameter_count(cin: int, dim: int, heads: int, depth: int, classes: int) -> int:
    """Reference parameter count (talking_heads included), from SPEC sections 3-5."""
    widths = [cin, dim // 8, dim // 4, dim // 2, dim]
    embed = sum(9 * a * b + 2 * b for a, b in itertools.pairwise(widths)) + 9 * dim * dim + 2 * dim
    hidden = 4 * dim
    attention = 3 * (dim * dim + 2 * dim) + heads * heads + (dim * dim + dim + 2 * dim)
    mlp = (dim * hidden + hidden + 2 * hidden) + (hidden * dim + dim + 2 * dim)
    return embed + depth * (attention + mlp) + dim * classes + classes


# (in_channels, embed_dims, heads, depths, classes, img_size, pooling_stat) of the eight recipes.
RECIPES = {
    "cifar10_2_256": (3, 256, 8, 2, 10, 32, "0011"),
    "cifar10_2_512": (3, 512, 8, 2, 10, 32, "0011"),
    "cifar100_2_256": (3, 256, 8, 2, 100, 32, "0011"),
    "cifar100_2_512": (3, 512, 8, 2, 100, 32, "0011"),
    "imagenet_8_512": (3, 512, 8, 8, 1000, 224, "1111"),
    "imagenet_8_768": (3, 768, 8, 8, 1000, 224, "1111"),
    "cifar10dvs_2_256": (2, 256, 8, 2, 10, 64, "0011"),
    "ncaltech101_2_256": (2, 256, 8, 2, 101, 64, "0011"),
}
SPEC_COUNTS = {
    "cifar10_2_512": 10_233_546,
    "cifar10_2_256": 2_567_082,
    "imagenet_8_768": 66_339_144,
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_parameter_counts_equal_reference_less_talking_heads(recipe: str) -> None:
    cin, dim, heads, depth, classes, img, pool = RECIPES[recipe]
    with torch.device("meta"):
        model = statten.create_model(
            "sdt", img_size=img, in_channels=cin, num_classes=classes, embed_dims=dim,
            num_heads=heads, depths=depth, pooling_stat=pool,
        )  # fmt: skip
    reference = reference_parameter_count(cin, dim, heads, depth, classes)
    assert recipe not in SPEC_COUNTS or reference == SPEC_COUNTS[recipe]
    assert sum(p.numel() for p in model.parameters()) == reference - depth * heads * heads


def test_timm_registry_builds_the_same_model() -> None:
    torch.manual_seed(0)
    a = tiny()
    torch.manual_seed(0)
    b = timm.create_model("sdt", **TINY)
    assert type(a) is type(b)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        statten.create_model("resnet50")


def test_calls_are_independent_no_state_leaks() -> None:
    model = tiny().eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        first = model(x)
        model(torch.rand(3, 3, 16, 16) * 5)
        second = model(x)
    assert torch.equal(first, second)


@pytest.mark.parametrize("attention_mode", ["STAtten", "SDT"])
@pytest.mark.parametrize("spike_mode", ["lif", "plif"])
def test_event_input_tet_and_backward_on_cpu(attention_mode: str, spike_mode: str) -> None:
    model = tiny(
        in_channels=2, T=4, chunk_size=4, dvs_mode=True, TET=True,
        attention_mode=attention_mode, spike_mode=spike_mode,
    )  # fmt: skip
    out = model(torch.rand(3, 4, 2, 16, 16))
    assert out.shape == (4, 3, 5)
    out.mean(0).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_plif_changes_only_the_reference_neurons() -> None:
    learnable = sorted(n for n, _ in tiny(spike_mode="plif").named_parameters() if n.endswith(".w"))
    assert learnable == ["block.0.mlp.fc1_lif.w", "block.0.mlp.fc2_lif.w", "head_lif.w"]
    assert not [n for n, _ in tiny(spike_mode="lif").named_parameters() if n.endswith(".w")]


@pytest.mark.parametrize("chunk_size", [1, 2, 4])
def test_any_chunk_size_dividing_t(chunk_size: int) -> None:
    out = tiny(T=4, chunk_size=chunk_size)(torch.rand(2, 3, 16, 16))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_chunk_size_changes_the_output_except_with_sdt() -> None:
    """Uses the golden weights, whose attention neurons fire (a random tiny model's do not)."""
    golden = torch.load(DATA / "static_statten.pt", weights_only=True)
    config = golden_model_config(golden["config"])

    def logits(**overrides):
        model = statten.create_model("sdt", **{**config, **overrides}).eval()
        statten.load_checkpoint(model, golden["state_dict"])
        with torch.no_grad():
            return model(golden["input"])

    assert not torch.equal(logits(chunk_size=1), logits(chunk_size=4))
    assert torch.equal(logits(attention_mode="SDT", chunk_size=1), logits(attention_mode="SDT"))


def test_drop_path_drops_whole_samples_in_training_only() -> None:
    model = tiny(drop_path_rate=0.5, depths=2)
    x = torch.rand(4, 3, 16, 16)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"T": 4, "chunk_size": 3}, r"T=4 is not divisible by chunk_size=3"),
        ({"embed_dims": 30, "num_heads": 4}, r"embed_dims=30 is not divisible by num_heads=4"),
        ({"pooling_stat": "011"}, r"malformed pooling_stat '011'"),
        ({"pooling_stat": "00a1"}, r"malformed pooling_stat '00a1'"),
        ({"attention_mode": "softmax"}, r"unknown attention_mode 'softmax'"),
        ({"spike_mode": "alif"}, r"unknown spike_mode 'alif'"),
    ],
)
def test_invalid_configuration_raises_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 1, 16, 16), r"input has 1 channels .* expects in_channels=3"),
        ((2, 4, 2, 16, 16), r"input has 2 channels .* expects in_channels=3"),
        ((2, 3, 3, 16, 16), r"event input has 3 time steps .* T=4"),
        ((3, 16, 16), r"expected images \[B, C, H, W\] or event frames .* 3-D input"),
    ],
)
def test_input_that_does_not_fit_raises_value_error(shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny()(torch.rand(shape))
