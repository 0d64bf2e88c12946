"""``statten profile``: hand-counted operations and energy, SpikingJelly agreement, CLI outputs."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import DATA
from spikingjelly.activation_based.neuron import BaseNode
from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter
from torch import nn

import statten
from statten.analysis import EnergyModel, OpRecorder
from statten.analysis.ops import is_spike_count
from statten.attention import SpatioTemporalAttention
from statten.cli import main
from statten.data import create_eval_loader
from statten.engine import tester
from statten.engine.profiler import SCHEMA
from statten.models.sdt import SpikingSelfAttention

aten = torch.ops.aten
E_MAC, E_AC = 4.6e-9, 0.9e-9  # mJ per operation
CHECKPOINT = DATA / "static_statten_official_format.pth.tar"
DIGITS_32PX = ["--dataset", "digits", "--img-size", "32", "--in-channels", "3", "--device", "cpu"]
DATA_FLAGS = [*DIGITS_32PX, "--val-batch-size", "8"]
BATCHES = 2
REPORT_KEYS = "schema model data time_steps samples params energy_model metrics firing_rates"
REPORT_KEYS += " layers totals"
LAYER_KEYS = "name kind params spike_driven macs flops sops input_rate energy_mj total"


def record(module: nn.Module, time_steps: int, *inputs: torch.Tensor) -> dict:
    """``{row name: LayerOps}`` of one call of ``module`` (named ``layer`` in the rows)."""
    holder = nn.ModuleDict({"layer": module})
    with torch.no_grad(), OpRecorder(holder, time_steps) as ops:
        module(*inputs)
    return {layer.name: layer for layer in ops.layers()}


def spikes(*rows: str) -> torch.Tensor:
    """A 0/1 tensor from strings of digits, one string per row."""
    return torch.tensor([[float(c) for c in row] for row in rows])


# -- hand-counted layers ---------------------------------------------------------------------------


def test_conv_sops_and_energy_are_macs_times_input_rate() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    x = torch.zeros(2, 2, 4, 4)  # [T * B, C, H, W] with T = 2, B = 1
    x[0, 0, 0, :3] = 1  # step 0: 5 spikes
    x[0, 1, 3, 2:] = 1
    x[1, 1, 1, 1] = x[1, 0, 2, 3] = 1  # step 1: 2 spikes
    layer = record(conv, 2, x)["layer"]
    # Per step: 3 x 4 x 4 outputs x (2 x 9) inputs = 864 MACs over 32 input values.
    assert layer.kind == "conv" and layer.params == 54 and layer.spike_driven
    assert layer.macs.tolist() == [864.0, 864.0]
    assert layer.flops.tolist() == [1728.0, 1728.0]
    assert layer.sops.tolist() == [864 * 5 / 32, 864 * 2 / 32]  # 135, 54
    assert EnergyModel().layer_mj(layer).tolist() == pytest.approx([135 * E_AC, 54 * E_AC])


def test_conv_fed_real_values_costs_dense_macs() -> None:
    layer = record(nn.Conv2d(2, 3, 3, padding=1), 2, torch.full((2, 2, 4, 4), 0.5))["layer"]
    assert not layer.spike_driven and layer.params == 57
    assert EnergyModel(e_mac_pj=2.0).layer_mj(layer).tolist() == pytest.approx([864 * 2e-9] * 2)


def test_linear_sops_and_energy() -> None:
    x = spikes("1011", "0001").unsqueeze(1)  # [T=2, B=1, 4]
    layer = record(nn.Linear(4, 3), 2, x)["layer"]
    assert layer.kind == "linear" and layer.params == 15
    assert layer.macs.tolist() == [12.0, 12.0]
    assert layer.sops.tolist() == [9.0, 3.0]  # each input spike reaches 3 outputs
    assert EnergyModel(e_ac_pj=2.0).layer_mj(layer).tolist() == pytest.approx([18e-9, 6e-9])


def test_statten_products_hand_counted() -> None:
    # T = 2 (one block of chunk 2), B = 1, one head, N = 3 tokens, d = 2.
    q = torch.stack([spikes("10", "00", "11"), spikes("00", "01", "00")])
    k = torch.stack([spikes("10", "11", "00"), spikes("01", "00", "11")])
    v = torch.stack([spikes("11", "01", "10"), spikes("10", "11", "01")])
    q, k, v = (x[:, None, None] for x in (q, k, v))  # [T, B, heads, N, d]
    rows = record(SpatioTemporalAttention(chunk_size=2), 2, q, k, v, 0.5)
    assert set(rows) == {"layer[k^T v]", "layer[q (k^T v)]"}  # the scale folds into the LIF
    kv, q_kv = rows["layer[k^T v]"], rows["layer[q (k^T v)]"]
    # K^T V: N d^2 = 12 MACs per step; pairs of spikes |k_n| |v_n|: 1*2 + 2*1 + 0*1 = 4 at
    # step 0, 1*1 + 0*2 + 2*1 = 3 at step 1 (together: every entry of the block's K^T V).
    assert kv.macs.tolist() == [12.0, 12.0] and kv.sops.tolist() == [4.0, 3.0]
    k_block, v_block = k.squeeze().reshape(6, 2), v.squeeze().reshape(6, 2)
    assert (k_block.T @ v_block).sum() == 7
    # Q (K^T V): 12 MACs per step; |q| x d = 3 x 2 and 1 x 2.
    assert q_kv.macs.tolist() == [12.0, 12.0] and q_kv.sops.tolist() == [6.0, 2.0]
    assert kv.spike_driven and q_kv.spike_driven
    energy = EnergyModel()
    total = sum(energy.layer_mj(row).sum().item() for row in rows.values())
    assert total == pytest.approx((4 + 3 + 6 + 2) * E_AC)


def test_statten_counts_do_not_depend_on_chunk_size() -> None:
    q, k, v = (torch.rand(4, 2, 2, 5, 3).round() for _ in range(3))
    spatial = record(SpatioTemporalAttention(chunk_size=1), 4, q, k, v, 1.0)
    temporal = record(SpatioTemporalAttention(chunk_size=4), 4, q, k, v, 1.0)
    for name, row in spatial.items():
        assert row.macs.tolist() == temporal[name].macs.tolist()
        assert row.sops.tolist() == temporal[name].sops.tolist()


def sdt_attention_with_known_qkv() -> SpikingSelfAttention:
    """SDT attention over 4 channels (2 heads) whose Q, K, V are channel permutations of its
    input spikes: Q = s, K[c] = s[(c + 1) % 4], V[c] = s[(c + 2) % 4]."""
    attn = SpikingSelfAttention(dim=4, num_heads=2, attention_mode="SDT", chunk_size=1, dvs=False)
    eye = torch.eye(4)
    for name, shift in (("q", 0), ("k", 1), ("v", 2)):
        weight = 3.0 * eye.roll(shift, dims=1)  # output c reads input (c + shift) % 4
        getattr(attn, f"{name}_conv").weight.data = weight[:, :, None, None]
    return attn.eval()


def test_sdt_products_and_sums_hand_counted() -> None:
    # Input 2.0 makes the shortcut neuron fire (H = 1), 0 keeps it silent; channels x tokens.
    s0 = spikes("1100", "0110", "1000", "0011")
    s1 = spikes("1111", "1010", "0000", "0101")
    x = 2.0 * torch.stack([s0, s1]).reshape(2, 1, 4, 2, 2)  # [T, B, C, 2x2 tokens]
    rows = record(sdt_attention_with_known_qkv(), 2, x)
    # Step 0: K = 0110, 1000, 0011, 1100; V = 1000, 0011, 1100, 0110 -> K*V spikes only in
    # channel 3 (0100): 1 pair, 1 summed spike; the token-sum LIF fires for channel 3 alone,
    # so Q * kv keeps |Q[3]| = 2 spikes.
    # Step 1: K = 1010, 0000, 0101, 1111; V = 0000, 0101, 1111, 1010 -> K*V = 0101 (ch 2) and
    # 1010 (ch 3): 4 pairs, 4 summed; the LIF fires for channels 2 and 3: |Q[2]| + |Q[3]| = 2.
    expected = {"layer[k * v]": [1.0, 4.0], "layer[sum_N]": [1.0, 4.0], "layer[q * kv]": [2.0, 2.0]}
    for name, sops in expected.items():
        assert rows[name].sops.tolist() == sops and rows[name].spike_driven
        assert rows[name].macs.tolist() == [16.0, 16.0]  # B x C x N per step
    # Q/K/V convs: 16 outputs x 4 inputs = 64 MACs per step, fed 7 and 8 of 16 spikes.
    assert rows["layer.q_conv"].sops.tolist() == [28.0, 32.0]
    energy = EnergyModel()
    mix = sum(energy.layer_mj(rows[name]).sum().item() for name in expected)
    assert mix == pytest.approx(14 * E_AC)


# -- agreement with SpikingJelly's counters -----------------------------------------------------


def _spike_pairs(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    a, b = args[:2]
    both_spikes = torch.is_tensor(b) and b.dim() > 0 and is_spike_count(a) and is_spike_count(b)
    return int(out.sum().item()) if both_spikes else 0


def _summed_spikes(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    return int(args[0].sum().item()) if is_spike_count(args[0]) else 0


def firing_model(attention_mode: str, dvs: bool) -> nn.Module:
    """A small model with weights scaled up so that every neuron layer fires."""
    torch.manual_seed(0)
    model = statten.create_model(
        "sdt",
        img_size=16,
        in_channels=2,
        num_classes=5,
        embed_dims=32,
        num_heads=4,
        depths=1,
        T=4,
        chunk_size=2,
        attention_mode=attention_mode,
        dvs_mode=dvs,
    )
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data.normal_(0.05, 2.0 / module.weight[0].numel() ** 0.5)
    return model.eval()


@pytest.mark.parametrize("dvs", [False, True], ids=["static", "dvs"])
@pytest.mark.parametrize("attention_mode", ["STAtten", "SDT"])
def test_sops_agree_with_spikingjelly(attention_mode: str, dvs: bool) -> None:
    """SynOpCounter counts the same SOPs for 1x1 convs, the head and STAtten's products; the
    attention's element-wise spike products and sums match a SpikingJelly counter with rules
    for them (SynOpCounter does not count those)."""
    model = firing_model(attention_mode, dvs)
    x = torch.rand(2, 4, 2, 16, 16).round() if dvs else torch.randn(2, 2, 16, 16)
    with torch.no_grad(), OpRecorder(model, 4) as ops:
        model(x)
    ours = {layer.name: layer for layer in ops.layers()}
    synops = SynOpCounter(extra_ignore_modules=[nn.BatchNorm2d])
    attention_ops = SynOpCounter(
        extra_rules={aten.mul.Tensor: _spike_pairs, aten.sum.dim_IntList: _summed_spikes},
        extra_ignore_modules=[BaseNode, nn.Conv2d, nn.BatchNorm2d, SpatioTemporalAttention],
    )
    with torch.no_grad(), DispatchCounterMode([synops, attention_ops]):
        model(x)
    counts = {name.split(".", 1)[-1]: sum(c.values()) for name, c in synops.get_counts().items()}
    attn = sum(attention_ops.get_counts().get("SpikeDrivenTransformer.block.0.attn", {}).values())
    for name in ("q_conv", "k_conv", "v_conv", "mlp.fc1_conv", "mlp.fc2_conv"):
        name = f"block.0.{'attn.' if 'mlp' not in name else ''}{name}"
        assert ours[name].sops.sum().item() == counts[name] > 0
    assert ours["head"].sops.sum().item() == counts["head"] > 0
    products = [layer for name, layer in ours.items() if name.startswith("block.0.attn[")]
    assert sum(layer.sops.sum().item() for layer in products) == attn
    assert (attn > 0) == (attention_mode == "SDT" or dvs)  # plain STAtten has none
    if attention_mode == "STAtten":
        statten_sops = sum(ours[f"block.0.attn.statten[{p}]"].sops for p in ("k^T v", "q (k^T v)"))
        assert statten_sops.sum().item() == counts["block.0.attn.statten"] > 0
    # DVS STAtten feeds proj_conv x * x_pool + x_pool: spike counts 0..2, still spike-driven.
    assert ours["block.0.attn.proj_conv"].spike_driven
    assert ours["patch_embed.proj_conv"].spike_driven == dvs  # event counts vs real pixels


# -- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """``statten profile`` of the golden checkpoint on the first batches of the digits split."""
    out = tmp_path_factory.mktemp("profile")
    argv = ["profile", "--resume", str(CHECKPOINT), *DATA_FLAGS, "--batches", str(BATCHES)]
    argv += ["--json", str(out / "profile.json"), "--plot", str(out / "profile.png")]
    assert main(argv) == 0
    return json.loads((out / "profile.json").read_text()), out / "profile.png"


def test_firing_rates_equal_statten_test(
    profiled: tuple[dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``statten test`` (which has no --batches) restricted to the same first batches."""

    def first_batches(cfg: argparse.Namespace, model: nn.Module) -> list:
        return list(itertools.islice(create_eval_loader(cfg, model), BATCHES))

    monkeypatch.setattr(tester, "create_eval_loader", first_batches)
    report, _ = profiled
    argv = ["test", "--resume", str(CHECKPOINT), *DATA_FLAGS, "--json", str(tmp_path / "t.json")]
    assert main(argv) == 0
    tested = json.loads((tmp_path / "t.json").read_text())
    assert report["samples"] == tested["samples"] == 16
    assert report["firing_rates"] == tested["firing_rates"]
    assert report["metrics"]["top1"] == tested["top1"]


def test_json_schema(profiled: tuple[dict, Path]) -> None:
    report, _ = profiled
    T = report["time_steps"]
    assert report["schema"] == SCHEMA and T == 4
    assert set(report) == set(REPORT_KEYS.split())
    assert report["model"]["weights"] == str(CHECKPOINT)
    assert report["data"] == {
        "dataset": "digits",
        "split": "validation",
        "batch_size": 8,
        "batches": BATCHES,
    }
    assert report["params"] == 163_666
    assert all(len(rates) == T for rates in report["firing_rates"].values())
    energy = report["energy_model"]
    expected_mj = 0.0
    for layer in report["layers"]:
        assert set(layer) == set(LAYER_KEYS.split())
        per_op = energy["e_ac_pj"] if layer["spike_driven"] else energy["e_mac_pj"]
        ops = layer["sops"] if layer["spike_driven"] else layer["macs"]
        assert layer["energy_mj"] == pytest.approx([n * per_op * 1e-9 for n in ops])
        assert layer["total"]["energy_mj"] == pytest.approx(sum(layer["energy_mj"]))
        expected_mj += layer["total"]["energy_mj"]
    assert report["totals"]["energy_mj"] == pytest.approx(expected_mj)
    assert report["totals"]["energy_mj"] == pytest.approx(
        report["totals"]["energy_mac_mj"] + report["totals"]["energy_ac_mj"]
    )
    assert sum(report["totals"]["per_step"]["sops"]) == pytest.approx(report["totals"]["sops"])
    first = report["layers"][0]
    assert first["name"] == "patch_embed.proj_conv" and not first["spike_driven"]
    assert all(layer["spike_driven"] for layer in report["layers"][1:])


def test_png_written(profiled: tuple[dict, Path]) -> None:
    _, png = profiled
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000


def test_batches_and_energy_options(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    argv = ["profile", "--resume", str(CHECKPOINT), *DATA_FLAGS, "--batches", "1"]
    assert main([*argv, "--e-mac", "1", "--e_ac", "0.5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["samples"] == 8 and report["data"]["batches"] == 1
    assert report["energy_model"] == {"e_mac_pj": 1.0, "e_ac_pj": 0.5}


@pytest.mark.parametrize("bad", [["--batches", "-1"], ["--e-ac", "-0.9"], ["--no-such-flag"]])
def test_user_errors_print_one_line(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(["profile", *DIGITS_32PX, *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("statten profile: error:") and err.count("\n") == 1
