"""Comparisons of a model with the golden vectors of an official implementation (the tolerances
the model-family issues set: logits and loss 1e-4, every gradient within
``1e-3 * (|r| + 1e-4 * max |r|)`` in norm, max over the parameters, which floors the biases in
front of a train-mode BatchNorm (true gradient 0, golden values rounding noise), firing rates 1e-6
by official module path)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import statten


def assert_eval_pass_matches(model: torch.nn.Module, golden: dict[str, Any]) -> None:
    """Eval logits, and the firing rate of every neuron layer by its official module path, in
    the order the official code runs them."""
    model.eval()
    with torch.no_grad(), statten.SpikeRecorder(model) as recorder:
        logits = model(golden["input"])
    torch.testing.assert_close(logits, golden["logits_eval"], atol=1e-4, rtol=0)
    rates = recorder.mean_firing_rates()
    assert list(rates) == list(golden["firing_rates_eval"])
    for name, rate in rates.items():
        assert abs(rate - golden["firing_rates_eval"][name]) < 1e-6, name


def assert_train_pass_matches(model: torch.nn.Module, golden: dict[str, Any]) -> None:
    """Train logits, the cross-entropy loss and the gradient of every parameter."""
    model.train()
    logits = model(golden["input"])
    torch.testing.assert_close(logits, golden["logits_train"], atol=1e-4, rtol=0)
    loss = F.cross_entropy(logits, golden["target"])
    torch.testing.assert_close(loss, golden["loss_train"], atol=1e-4, rtol=0)
    loss.backward()
    params = dict(model.named_parameters())
    assert set(params) == set(golden["grads"])
    largest = max(r.norm().item() for r in golden["grads"].values())
    for name, ref in golden["grads"].items():
        bound = 1e-3 * (ref.norm() + 1e-4 * largest)
        assert (params[name].grad - ref).norm() <= bound, name


def assert_memory_efficient_matches(
    plain: torch.nn.Module, lean: torch.nn.Module, golden: dict[str, Any], grad_rtol: float = 0.0
) -> None:
    """``lean`` (``memory_efficient=True``) against ``plain`` (the same weights), in train mode:
    the same logits and BatchNorm statistics, gradients equal (or within ``grad_rtol`` in norm)."""
    outputs = [model.train()(golden["input"]) for model in (plain, lean)]
    assert torch.equal(*outputs)
    for out in outputs:
        F.cross_entropy(out, golden["target"]).backward()
    for (name, p), q in zip(plain.named_parameters(), lean.parameters(), strict=True):
        assert (p.grad - q.grad).norm() <= grad_rtol * p.grad.norm(), name
    for (name, a), b in zip(plain.state_dict().items(), lean.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
