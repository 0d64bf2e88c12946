"""Spike-driven Transformer v2 (Meta-SpikeFormer): the official code's outputs, loss, gradients and
firing rates (static and event input); the RepConv border rule; the distillation head; STAtten in
its 8 attention blocks; parameter counts; RepConv and SepConv operation counts; the tool chain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
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
from statten.config import model_config, parse_config
from statten.fast import optimize_for_inference
from statten.models.sdtv2 import BNAndPadLayer, RepConv, SepConv

DATA = Path(__file__).parent / "data" / "sdtv2"
CONF = Path(__file__).resolve().parents[1] / "conf" / "sdtv2"
CASES = ("static_native", "event_native")


def model_kwargs(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """statten keyword arguments of a golden case's official constructor arguments and T."""
    kwargs = {
        "img_size": config["img_size_h"],
        "in_channels": config["in_channels"],
        "num_classes": config["num_classes"],
        "embed_dims": config["embed_dim"],
        "num_heads": config["num_heads"],
        "mlp_ratio": config["mlp_ratios"],
        "T": config["T"],
        "kd": config["kd"],
    }
    return {**kwargs, **overrides}


@pytest.fixture(params=CASES, scope="module")
def golden(request: pytest.FixtureRequest) -> dict[str, Any]:
    return torch.load(DATA / f"{request.param}.pt", weights_only=True)


def golden_model(golden: dict[str, Any], **overrides: Any) -> torch.nn.Module:
    model = statten.create_model("sdtv2", **model_kwargs(golden["config"], **overrides))
    statten.load_checkpoint(model, golden["state_dict"], strict=True)
    return model


def test_eval_logits_and_firing_rates_match_the_official_code(golden: dict) -> None:
    assert_eval_pass_matches(golden_model(golden), golden)


def test_train_logits_loss_and_gradients_match_the_official_code(golden: dict) -> None:
    assert_train_pass_matches(golden_model(golden), golden)


def test_the_border_is_what_batchnorm_gives_zero_in_eval_mode() -> None:
    torch.manual_seed(0)
    layer = BNAndPadLayer(1, 3)
    bn = layer.bn
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    layer.eval()
    out = layer(torch.randn(2, 3, 4, 4))
    border = out[:, :, 0, :], out[:, :, -1, :], out[:, :, :, 0], out[:, :, :, -1]
    zero = bn(torch.zeros(1, 3, 1, 1)).view(1, 3, 1)
    for side in border:
        torch.testing.assert_close(side, zero.expand_as(side), atol=1e-6, rtol=0)
    formula = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.equal(out[0, :, 0, 0], formula.detach())


def test_the_border_uses_the_running_statistics_updated_by_the_batch_in_train_mode() -> None:
    """SPEC 4.3.1: mu <- 0.9 mu + 0.1 mean, var <- 0.9 var + 0.1 unbiased var, then the formula;
    gamma and beta detached (no gradient through the border)."""
    torch.manual_seed(1)
    layer = BNAndPadLayer(1, 3).train()
    bn = layer.bn
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    x = torch.randn(2, 3, 4, 4)
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    out = layer(x)
    n = x.numel() // 3
    mean = 0.9 * before_mean + 0.1 * x.mean((0, 2, 3))
    var = 0.9 * before_var + 0.1 * x.var((0, 2, 3), unbiased=False) * n / (n - 1)
    expected = bn.bias - mean * bn.weight / torch.sqrt(var + bn.eps)
    torch.testing.assert_close(out[0, :, 0, 0], expected.detach(), atol=1e-6, rtol=0)
    stale = bn.bias - before_mean * bn.weight / torch.sqrt(before_var + bn.eps)
    assert (out[0, :, 0, 0] - stale).abs().max() > 1e-3  # not the statistics of before
    out[:, :, 0, 0].sum().backward()
    assert bn.weight.grad is None or bn.weight.grad.abs().max() == 0


def test_kd_head_returns_the_pair_in_training_and_their_mean_in_eval() -> None:
    golden = torch.load(DATA / "static_native.pt", weights_only=True)
    model = statten.create_model("sdtv2", **model_kwargs(golden["config"], kd=True))
    statten.load_checkpoint(model, golden["state_dict"], strict=False)  # head_kd stays random
    x, target = golden["input"], golden["target"]
    with torch.no_grad():
        spikes = model.eval().lif(model.forward_features(model.time_major(x)))
        heads = model.head(spikes).mean(0), model.head_kd(spikes).mean(0)
        torch.testing.assert_close(model(x), (heads[0] + heads[1]) / 2, atol=0, rtol=0)
    logits, logits_kd = model.train()(x)
    assert logits.shape == logits_kd.shape == (3, 10)
    loss = model.loss((logits, logits_kd), target, F.cross_entropy)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits_kd, target)) / 2
    torch.testing.assert_close(loss, expected)


def test_statten_with_chunk_1_is_sdsa_and_longer_chunks_attend_across_steps(golden: dict) -> None:
    x = golden["input"]
    with torch.no_grad():
        native = golden_model(golden).eval()(x)
        chunk_1 = golden_model(golden, attention_mode="STAtten", chunk_size=1).eval()(x)
        chunk_4 = golden_model(golden, attention_mode="STAtten", chunk_size=4).eval()(x)
    assert torch.equal(chunk_1, native)
    assert (chunk_4 - native).abs().max() > 1e-3
    model = golden_model(golden, attention_mode="STAtten", chunk_size=2)
    chunks = [m.chunk_size for m in model.modules() if hasattr(m, "chunk_size")]
    assert chunks == [2] * 8  # the 8 attention blocks, and nothing else
    with pytest.raises(ValueError, match="T=4 is not divisible by chunk_size=3"):
        golden_model(golden, attention_mode="STAtten", chunk_size=3)


def test_memory_efficient_mode_is_bit_identical(golden: dict) -> None:
    plain = golden_model(golden, memory_efficient=False)
    lean = golden_model(golden, memory_efficient=True)
    assert_memory_efficient_matches(plain, lean, golden)


def test_fast_inference_stays_close_to_the_eval_model(golden: dict) -> None:
    model, x = golden_model(golden).eval(), golden["input"]
    fast = optimize_for_inference(model, compile_kernels=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_dims": [8, 16, 24]}, "embed_dims must be 4 stage widths"),
        ({"mlp_ratio": 2}, "mlp_ratio must be 4"),
        ({"embed_dims": [8, 16, 24, 30], "num_heads": 4}, "embed_dims=30 is not divisible"),
        ({"attention_mode": "SSA"}, "unknown attention_mode 'SSA' for sdtv2"),
    ],
)
def test_invalid_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        statten.create_model("sdtv2", **kwargs)


# (embed_dims, parameters without kd, with kd): SPEC section 7 (224 px, 1000 classes, 8 heads).
PUBLISHED = [
    ([64, 128, 256, 360], 15_112_208, 15_473_208),
    ([96, 192, 384, 480], 31_333_864, 31_814_864),
    ([128, 256, 512, 640], 55_350_248, 55_991_248),
]


@pytest.mark.parametrize(("dims", "count", "count_kd"), PUBLISHED)
def test_parameter_counts_of_the_published_variants(dims: list, count: int, count_kd: int) -> None:
    with torch.device("meta"):
        plain = statten.create_model("sdtv2", embed_dims=dims)
        with_kd = statten.create_model("sdtv2", embed_dims=dims, kd=True)
    assert sum(p.numel() for p in plain.parameters()) == count
    assert sum(p.numel() for p in with_kd.parameters()) == count_kd


def test_hand_counted_operations_of_a_repconv() -> None:
    """RepConv(2, 2) on one 2x2 sample with 3 spikes: the 1x1 conv adds weights of spikes; the
    depthwise 3x3 and the second 1x1 read BatchNorm outputs, so they are dense MACs."""
    rep = RepConv(2, 2).eval()
    x = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]])  # [1, 2, 2, 2]
    holder = torch.nn.ModuleDict({"rep": rep})
    with torch.no_grad(), OpRecorder(holder, time_steps=1) as ops:
        rep(x)
    rows = {layer.name: layer for layer in ops.layers()}
    first, depthwise, second = rows["rep.body.0"], rows["rep.body.2.0"], rows["rep.body.2.1"]
    assert first.macs.tolist() == [16.0] and first.sops.tolist() == [6.0] and first.spike_driven
    assert depthwise.macs.tolist() == [72.0] and not depthwise.spike_driven  # 8 outputs x 9
    assert second.macs.tolist() == [16.0] and not second.spike_driven
    assert list(rows) == ["rep.body.0", "rep.body.2.0", "rep.body.2.1"]  # BatchNorms not counted


def test_hand_counted_operations_of_a_sepconv() -> None:
    """SepConv(2): lif1 fires where x >= 2 (3 of 8); pwconv1 = 4 [[1,0],[0,1],[1,1],[0,0]]
    with eval BatchNorm makes lif2 fire on 5 of 16; the 7x7 depthwise conv counts every tap."""
    sep = SepConv(2).eval()
    with torch.no_grad():
        weight = 4 * torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]])
        sep.pwconv1.weight.copy_(weight.view(4, 2, 1, 1))
    x = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [0.0, 0.0]]]).view(1, 1, 2, 2, 2)
    holder = torch.nn.ModuleDict({"sep": sep})
    with torch.no_grad(), OpRecorder(holder, time_steps=1) as ops:
        sep(x)
    rows = {layer.name: layer for layer in ops.layers()}
    pw1, dw, pw2 = rows["sep.pwconv1"], rows["sep.dwconv"], rows["sep.pwconv2"]
    assert pw1.macs.tolist() == [32.0] and pw1.sops.tolist() == [12.0] and pw1.spike_driven
    assert dw.macs.tolist() == [784.0] and dw.sops.tolist() == [245.0] and dw.spike_driven
    assert pw2.macs.tolist() == [32.0] and not pw2.spike_driven  # fed the depthwise output


def test_widths_follow_dim_as_in_the_official_factories_unless_given() -> None:
    cfg = parse_config(["--model", "sdtv2", "--dim", "384"], "train")
    assert model_config(cfg)["embed_dims"] == [96, 192, 384, 480]  # metaspikformer_8_384
    cfg = parse_config(["--model", "sdtv2", "--stage-dims", "64", "128", "256", "360"], "train")
    assert model_config(cfg)["embed_dims"] == [64, 128, 256, 360]
    assert "depths" not in model_config(cfg)  # the depth is fixed at 6 + 2 blocks


def test_official_args_rebuild_the_model() -> None:
    args = {"model": "metaspikformer_8_512", "nb_classes": 1000, "time_steps": 4, "kd": True}
    state = {"model": {}, "args": args}
    assert statten.model_config_from_checkpoint(state) == {
        "embed_dims": [128, 256, 512, 640],
        "num_classes": 1000,
        "num_heads": 8,
        "T": 4,
        "kd": True,
    }


RECIPES = sorted(p.name for p in CONF.glob("*.yml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_run_builds_its_model(recipe: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "-c", str(CONF / recipe), "--device", "cpu", "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    config = summary["model_config"]
    assert summary["model"] == "sdtv2"
    assert config["attention_mode"] == ("STAtten" if "statten" in recipe else "SDSA")
    if config["attention_mode"] == "STAtten":
        assert config["chunk_size"] == {4: 2, 16: 4}[config["T"]]
    counts = {tuple(d): (n, k) for d, n, k in PUBLISHED}
    if recipe.startswith("imagenet"):
        plain, kd = counts[tuple(config["embed_dims"])]
        assert summary["parameters"] == (kd if config.get("kd") else plain)


def test_recipes_cover_the_published_settings() -> None:
    names = set(RECIPES)
    for size in ("15m", "31m", "55m"):
        assert f"imagenet_{size}_t1.yml" in names
        assert (
            f"imagenet_{size}_t4_kd.yml" in names and f"imagenet_{size}_t4_kd_statten.yml" in names
        )
    assert any(n.startswith("cifar10_") for n in names)
    assert any(n.startswith("cifar10dvs_") for n in names)


SMALL = [
    "--model", "sdtv2", "--dim", "32", "--num-heads", "4", "--batch-size", "64", "--workers",
    "0", "--device", "cpu", "--warmup-epochs", "0",
]  # fmt: skip


def test_train_with_kd_test_and_profile_on_digits(tmp_path: Path) -> None:
    args = [*SMALL, "--kd", "--epochs", "2", "--output", str(tmp_path), "--experiment", "run"]
    assert main(["train", *args]) == 0
    checkpoint = tmp_path / "train" / "run" / "last.pth.tar"
    stored = read_checkpoint(checkpoint)
    assert stored["arch"] == "sdtv2" and stored["model_config"]["kd"] is True
    assert stored["model_config"]["T"] == 4  # T travels with the checkpoint
    metrics = tmp_path / "metrics.json"
    assert main(["test", "--resume", str(checkpoint), "--json", str(metrics)]) == 0
    assert "block4.1.attn.attn_lif" in json.loads(metrics.read_text())["firing_rates"]
    profile = tmp_path / "profile.json"
    assert main(["profile", "--resume", str(checkpoint), "--batches", "1", "--json",
                 str(profile)]) == 0  # fmt: skip
    rows = {layer["name"] for layer in json.loads(profile.read_text())["layers"]}
    assert {"block3.0.attn.statten[k^T v]", "ConvBlock1_1.0.Conv.dwconv"} <= rows


def test_t4_kd_fine_tune_starts_from_a_t1_checkpoint_without_kd_head(tmp_path: Path) -> None:
    """The official two-stage recipe: T 1 pre-training, then --initial-checkpoint into a T 4
    model with a distillation head, which the checkpoint lacks (kept as initialised)."""
    common = [*SMALL, "--epochs", "1", "--output", str(tmp_path)]
    assert main(["train", *common, "--time-steps", "1", "--chunk-size", "1", "--experiment",
                 "t1"]) == 0  # fmt: skip
    t1 = tmp_path / "train" / "t1" / "last.pth.tar"
    cfg = parse_config([*SMALL, "--kd", "--initial-checkpoint", str(t1)], "train")
    from statten.engine.distributed import DistributedContext
    from statten.engine.trainer import Trainer

    trainer = Trainer(cfg, DistributedContext(0, 1, 0, torch.device("cpu")))
    weights = read_checkpoint(t1)["state_dict"]
    assert torch.equal(trainer.model.head.weight, weights["head.weight"])
    assert torch.equal(trainer.model.block3[0].attn.q_conv[1].running_mean,
                       weights["block3.0.attn.q_conv.1.running_mean"])  # fmt: skip
    assert trainer.model.T == 4 and trainer.model.kd


def test_bench_measures_an_sdtv2_recipe(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    argv = [*SMALL, "--kd", "-b", "2", "--repeats", "1", "--warmup", "0", "--eager-kernels"]
    bench.main([*argv, "--json", str(path)])
    document = json.loads(path.read_text())
    assert {(r["task"], r["mode"]) for r in document["results"]} == {
        (t, m) for t in bench.TASKS for m in bench.MODES
    }
