"""QKFormer: the official code's outputs, loss, gradients, firing rates and checkpoints (with its
batch-chained proj_lif); the corrected proj_lif; STAtten in the SSA stages; parameter counts;
Q-K token attention operation counts; the tool chain on digits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from golden_checks import (
    assert_eval_pass_matches,
    assert_memory_efficient_matches,
    assert_train_pass_matches,
)

import statten
from statten import bench
from statten.analysis import OpRecorder
from statten.checkpoint import read_checkpoint
from statten.cli import main
from statten.config import ConfigError, model_config, parse_config
from statten.fast import optimize_for_inference
from statten.models.qkformer import TokenQKAttention

DATA = Path(__file__).parent / "data" / "qkformer"
CONF = Path(__file__).resolve().parents[1] / "conf" / "qkformer"
CASES = ("cifar_native", "dvs_native", "cifar_statten_c2")
VARIANT_OF_FILE = {"cifar10": "cifar", "cifar100": "cifar", "cifar10dvs": "dvs", "dvs128": "dvs"}


def model_kwargs(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """statten keyword arguments of a golden case's official constructor arguments.

    The official DVS file builds 1 + 1 blocks whatever its ``depths`` says; statten's ``depths``
    counts the blocks it builds.
    """
    variant = VARIANT_OF_FILE[config["variant"]]
    kwargs = {
        "variant": variant,
        "img_size": config["img_size_h"],
        "in_channels": config["in_channels"],
        "num_classes": config["num_classes"],
        "embed_dims": config["embed_dims"],
        "num_heads": config["num_heads"],
        "depths": 2 if variant == "dvs" else config["depths"],
        "mlp_ratio": config["mlp_ratios"],
        "T": config["T"],
        "attention_mode": "STAtten" if config["attention"] == "statten" else "SSA",
        "chunk_size": config["chunk"],
    }
    return {**kwargs, **overrides}


@pytest.fixture(params=CASES, scope="module")
def golden(request: pytest.FixtureRequest) -> dict[str, Any]:
    return torch.load(DATA / f"{request.param}.pt", weights_only=True)


def golden_model(golden: dict[str, Any], **overrides: Any) -> torch.nn.Module:
    model = statten.create_model("qkformer", **model_kwargs(golden["config"], **overrides))
    statten.load_checkpoint(model, golden["state_dict"], strict=True)
    return model


def test_eval_logits_and_firing_rates_match_the_official_code(golden: dict) -> None:
    assert_eval_pass_matches(golden_model(golden), golden)


def test_train_logits_loss_and_gradients_match_the_official_code(golden: dict) -> None:
    assert_train_pass_matches(golden_model(golden), golden)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_by_default_a_sample_depends_on_the_rest_of_its_batch(golden: dict) -> None:
    """The official proj_lif runs over time and batch flattened (official issue #14)."""
    model, x = golden_model(golden), golden["input"]
    batch = _logits(model, x)
    assert (batch[0] - _logits(model, x[:1])[0]).abs().max() > 1e-2  # alone: 0.03 to 0.12
    assert (batch - _logits(model, x.flip(0)).flip(0)).abs().max() > 1e-1  # reversed: 0.19-0.23


def test_proj_lif_per_sample_makes_a_sample_independent_of_its_batch(golden: dict) -> None:
    model, x = golden_model(golden, proj_lif_per_sample=True), golden["input"]
    batch = _logits(model, x)
    torch.testing.assert_close(_logits(model, x[:1])[0], batch[0], atol=1e-5, rtol=0)
    assert torch.equal(_logits(model, x.flip(0)).flip(0), batch)
    assert (batch - golden["logits_eval"]).abs().max() > 1e-3  # not the official computation


def test_memory_efficient_mode_is_bit_identical(golden: dict) -> None:
    plain = golden_model(golden, memory_efficient=False)
    lean = golden_model(golden, memory_efficient=True)
    assert_memory_efficient_matches(plain, lean, golden)


def test_fast_inference_changes_no_spike_of_the_golden_cases(golden: dict) -> None:
    model, x = golden_model(golden).eval(), golden["input"]
    fast = optimize_for_inference(model, compile_kernels=False)
    with torch.no_grad(), statten.SpikeRecorder(model, keep_spikes=True) as plain:
        logits = model(x)
    with torch.no_grad(), statten.SpikeRecorder(fast, keep_spikes=True) as folded:
        fast_logits = fast(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
    assert list(folded.spikes) == list(plain.spikes)
    for name, spikes in plain.spikes.items():
        assert torch.equal(spikes[0], folded.spikes[name][0]), name
    torch.testing.assert_close(fast_logits, logits, atol=1e-4, rtol=0)


def test_statten_with_chunk_1_is_ssa_and_longer_chunks_attend_across_steps() -> None:
    golden = torch.load(DATA / "cifar_native.pt", weights_only=True)
    native = _logits(golden_model(golden), golden["input"])
    chunk_1 = golden_model(golden, attention_mode="STAtten", chunk_size=1)
    assert torch.equal(_logits(chunk_1, golden["input"]), native)
    chunk_4 = golden_model(golden, attention_mode="STAtten", chunk_size=4)
    assert (_logits(chunk_4, golden["input"]) - native).abs().max() > 1e-3
    with pytest.raises(ValueError, match="T=4 is not divisible by chunk_size=3"):
        golden_model(golden, attention_mode="STAtten", chunk_size=3)


def test_statten_leaves_the_qk_token_attention_as_it_is() -> None:
    golden = torch.load(DATA / "cifar_native.pt", weights_only=True)
    model = golden_model(golden, attention_mode="STAtten", chunk_size=2)
    chunks = {n: m.chunk_size for n, m in model.named_modules() if hasattr(m, "chunk_size")}
    assert chunks == {"stage3.0.ssa.statten": 2, "stage3.1.ssa.statten": 2}
    assert isinstance(model.stage1[0].tssa, TokenQKAttention)


def test_cifar_format_checkpoint_builds_its_model_and_reproduces_the_logits() -> None:
    golden = torch.load(DATA / "cifar_native.pt", weights_only=True)
    path = DATA / "cifar_native_official_format.pth.tar"  # arch "spiking_transformer"
    assert statten.model_config_from_checkpoint(read_checkpoint(path)) == {
        "variant": "cifar",
        "img_size": 32,
        "num_classes": 10,
        "embed_dims": 64,
        "num_heads": 8,
        "depths": 4,
        "mlp_ratio": 4.0,
        "T": 4,
    }
    model = statten.create_model_from_checkpoint(path)
    torch.testing.assert_close(
        _logits(model, golden["input"]), golden["logits_eval"], atol=1e-4, rtol=0
    )


def test_dvs_format_checkpoint_loads_strictly_and_reproduces_the_logits() -> None:
    golden = torch.load(DATA / "dvs_native.pt", weights_only=True)
    model = statten.create_model("qkformer", **model_kwargs(golden["config"]))
    statten.load_checkpoint(model, DATA / "dvs_native_official_format.pth", strict=True)
    torch.testing.assert_close(
        _logits(model, golden["input"]), golden["logits_eval"], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "cifar10"}, "unknown QKFormer variant 'cifar10'"),
        ({"attention_mode": "SDT"}, "unknown attention_mode 'SDT' for qkformer"),
        ({"embed_dims": 384, "num_heads": 7}, "embed_dims=384 is not divisible by num_heads=7"),
        ({"embed_dims": 64, "num_heads": 32}, "num_heads=32 dividing every stage's width"),
        ({"depths": 2}, "leaves no SSA block"),
        ({"variant": "dvs", "img_size": 72}, "multiple of 16"),
    ],
)
def test_invalid_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        statten.create_model("qkformer", **kwargs)


# (variant, embed_dims, heads, depths, mlp_ratio, classes, parameters): SPEC section 5.
PUBLISHED = [
    ("imagenet", 384, 6, 10, 4, 1000, 16_473_688),
    ("imagenet", 512, 8, 10, 4, 1000, 29_079_336),
    ("imagenet", 768, 12, 10, 4, 1000, 64_962_760),
    ("cifar", 384, 8, 4, 4, 10, 6_706_234),
    ("cifar", 384, 8, 4, 4, 100, 6_740_884),
    ("dvs", 256, 16, 2, 1, 10, 1_504_138),
    ("dvs", 256, 16, 2, 4, 11, 1_999_371),
]


@pytest.mark.parametrize(
    ("variant", "dims", "heads", "depths", "mlp", "classes", "count"), PUBLISHED
)
def test_parameter_counts_of_the_published_variants(
    variant: str, dims: int, heads: int, depths: int, mlp: int, classes: int, count: int
) -> None:
    with torch.device("meta"):
        model = statten.create_model(
            "qkformer", variant=variant, embed_dims=dims, num_heads=heads, depths=depths,
            mlp_ratio=mlp, num_classes=classes,
        )  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == count


def test_hand_counted_operations_of_a_qk_token_attention_block() -> None:
    """D 4, 2 heads, 2 tokens, T 1; q = 2 diag(1, 1, 0, 1), k = 2 I, eval BatchNorm: a spike
    where 2 x w >= 2 (SPEC 3.2: a token of a head passes when any of its Q channels spiked)."""
    attn = TokenQKAttention(4, num_heads=2).eval()
    with torch.no_grad():
        attn.q_conv.weight.copy_(2 * torch.diag(torch.tensor([1.0, 1, 0, 1]))[..., None])
        attn.k_conv.weight.copy_(2 * torch.eye(4)[..., None])
    x = torch.tensor([[2.0, 0.0], [0.0, 0.0], [2.0, 2.0], [0.0, 2.0]]).view(1, 1, 4, 1, 2)
    # Q = [[1,0],[0,0],[0,0],[0,1]], K = [[1,0],[0,0],[1,1],[0,1]]; masks: head 0 [1,0],
    # head 1 [0,1]; mask * K = [[1,0],[0,0],[0,1],[0,1]].
    holder = torch.nn.ModuleDict({"tssa": attn})
    with torch.no_grad(), OpRecorder(holder, time_steps=1) as ops:
        attn(x)
    rows = {layer.name: layer for layer in ops.layers()}
    q_conv = rows["tssa.q_conv"]  # 2 tokens x 4 outputs x 4 inputs, input mean 8 / 8
    assert q_conv.kind == "conv" and q_conv.macs.tolist() == [32.0]
    assert q_conv.sops.tolist() == [32.0] and q_conv.spike_driven
    q_sum, masked = rows["tssa[sum_d q]"], rows["tssa[mask * k]"]
    assert (q_sum.kind, q_sum.macs.tolist(), q_sum.sops.tolist()) == ("sum", [8.0], [2.0])
    assert (masked.kind, masked.macs.tolist(), masked.sops.tolist()) == ("mul", [8.0], [3.0])
    assert q_sum.spike_driven and masked.spike_driven
    proj = rows["tssa.proj_conv"]  # fed mask * K: 3 spikes of 8
    assert proj.macs.tolist() == [32.0] and proj.sops.tolist() == [12.0]


RECIPES = sorted(p.name for p in CONF.glob("*.yml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_run_builds_its_model(recipe: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "-c", str(CONF / recipe), "--device", "cpu", "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    config = summary["model_config"]
    assert summary["model"] == "qkformer"
    assert config["attention_mode"] == ("STAtten" if recipe.endswith("_statten.yml") else "SSA")
    if config["attention_mode"] == "STAtten":
        assert config["chunk_size"] == {4: 2, 16: 4}[config["T"]]
    published = {(v, d, m, k): count for v, d, _, _, m, k, count in PUBLISHED}
    key = (config["variant"], config["embed_dims"], config["mlp_ratio"], config["num_classes"])
    assert summary["parameters"] == published[key]


def test_recipes_cover_the_published_settings_with_ssa_and_statten() -> None:
    assert len(RECIPES) == 12
    assert sum(name.endswith("_statten.yml") for name in RECIPES) == 6


SMALL = [
    "--model", "qkformer", "--dim", "32", "--num-heads", "4", "--layer", "3",
    "--batch-size", "64", "--workers", "0", "--device", "cpu", "--warmup-epochs", "0",
]  # fmt: skip


def test_train_test_and_profile_on_digits(tmp_path: Path) -> None:
    args = [*SMALL, "--epochs", "2", "--output", str(tmp_path), "--experiment", "run"]
    assert main(["train", *args]) == 0
    checkpoint = tmp_path / "train" / "run" / "last.pth.tar"
    assert read_checkpoint(checkpoint)["arch"] == "qkformer"
    metrics = tmp_path / "metrics.json"
    assert main(["test", "--resume", str(checkpoint), "--json", str(metrics)]) == 0
    assert "stage3.0.ssa.proj_lif" in json.loads(metrics.read_text())["firing_rates"]
    profile = tmp_path / "profile.json"
    assert main(["profile", "--resume", str(checkpoint), "--batches", "1", "--json",
                 str(profile)]) == 0  # fmt: skip
    rows = {layer["name"] for layer in json.loads(profile.read_text())["layers"]}
    assert {"stage1.0.tssa[mask * k]", "stage3.0.ssa.statten[k^T v]"} <= rows


def test_the_corrected_proj_lif_is_a_training_option() -> None:
    cfg = parse_config([*SMALL, "--proj-lif-per-sample"], "train")
    assert model_config(cfg)["proj_lif_per_sample"] is True
    model = statten.create_model("qkformer", **model_config(cfg))
    assert not model.stage3[0].ssa.proj_lif.chained
    with pytest.raises(ConfigError, match="proj_lif_per_sample: not an option of model sdt"):
        parse_config(["--proj-lif-per-sample", "false"], "train")


def test_bench_measures_a_qkformer_recipe(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    argv = [*SMALL, "-b", "2", "--repeats", "1", "--warmup", "0", "--eager-kernels"]
    bench.main([*argv, "--json", str(path)])
    document = json.loads(path.read_text())
    assert {(r["task"], r["mode"]) for r in document["results"]} == {
        (t, m) for t in bench.TASKS for m in bench.MODES
    }
