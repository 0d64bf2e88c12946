"""The model reproduces the reference implementation's outputs, loss and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import DATA, golden_model_config

import statten
import statten.checkpoint


def _golden_model(golden: dict) -> torch.nn.Module:
    model = statten.create_model("sdt", **golden_model_config(golden["config"]))
    statten.load_checkpoint(model, golden["state_dict"], strict=True)
    return model


def test_eval_logits_match_reference(golden: dict) -> None:
    model = _golden_model(golden).eval()
    with torch.no_grad():
        logits = model(golden["input"])
    torch.testing.assert_close(logits, golden["logits_eval"], atol=1e-4, rtol=0)


def test_train_logits_loss_and_gradients_match_reference(golden: dict) -> None:
    model = _golden_model(golden).train()
    logits = model(golden["input"])
    torch.testing.assert_close(logits, golden["logits_train"], atol=1e-4, rtol=0)
    output = logits.mean(0) if golden["config"]["tet"] else logits
    loss = F.cross_entropy(output, golden["target"])
    torch.testing.assert_close(loss, golden["loss_train"], atol=1e-4, rtol=0)
    loss.backward()

    params = dict(model.named_parameters())
    assert set(params) == set(golden["grads"])
    largest = max(r.abs().max().item() for r in golden["grads"].values())
    for name, ref in golden["grads"].items():
        grad = params[name].grad
        bound = 1e-3 * (ref.norm() + 1e-4 * largest)
        assert (grad - ref).norm() <= bound, (
            f"{name}: |g - r| = {(grad - ref).norm():.3g} > {bound:.3g}"
        )


def _reference_hook_name(name: str) -> str:
    """Our neuron-layer name -> the hook name the reference used for the same spikes."""
    if name.startswith("patch_embed.proj_lif"):
        return "MS_SPS_lif" + name.removeprefix("patch_embed.proj_lif")
    if name == "head_lif":
        return name
    _, index, part, neuron = name.split(".")
    prefix = {"attn": "MS_SSA_Conv", "mlp": "MS_MLP_Conv"}[part] + index
    suffix = {
        "shortcut_lif": "first_lif",
        "attn_lif": "after_qkv",
        "talking_heads_lif": "kv",
    }.get(neuron, neuron)
    return f"{prefix}_{suffix}"


def test_recorded_firing_rates_match_reference(golden: dict) -> None:
    model = _golden_model(golden).eval()
    with torch.no_grad(), statten.SpikeRecorder(model) as recorder:
        model(golden["input"])
    rates = recorder.mean_firing_rates()
    assert list(rates) == recorder.layer_names()
    for name, rate in rates.items():
        assert abs(rate - golden["firing_rates_eval"][_reference_hook_name(name)]) < 1e-6, name


def test_reference_format_checkpoint_reproduces_golden_logits() -> None:
    golden = torch.load(DATA / "static_statten.pt", weights_only=True)
    path = DATA / "static_statten_official_format.pth.tar"
    checkpoint = statten.checkpoint.read_checkpoint(path)
    model = statten.create_model("sdt", **statten.model_config_from_checkpoint(checkpoint))
    statten.load_checkpoint(model, path, strict=True)
    with torch.no_grad():
        logits = model.eval()(golden["input"])
    torch.testing.assert_close(logits, golden["logits_eval"], atol=1e-4, rtol=0)
    rebuilt = statten.create_model_from_checkpoint(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(golden["input"]), logits, atol=0, rtol=0)
