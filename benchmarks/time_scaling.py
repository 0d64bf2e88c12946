"""How the cost grows with T and the STAtten chunk size: the table of docs/performance.md.

For T in 4, 8, 16 and STAtten with chunk sizes 1 (spatial-only attention), 2, 4 and T, plus SDT
attention, times (CPU, eager fp32, median of round-robin repeats):

- the token mix alone (``SpatioTemporalAttention`` / SDT's ``Q * LIF(sum_N K * V)``) on Bernoulli
  spikes at the recipe's shapes, forward + backward;
- one attention block (``SpikingSelfAttention``: Q/K/V convs, neurons, mix, projection),
  forward + backward;
- one training step of the whole model (forward, backward, optimizer step).

Times are also given relative to spatial-only attention (STAtten with chunk 1) at the same T.

    python benchmarks/time_scaling.py [-c conf/cifar10/2_512_200E_t4.yml] [--batch 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from statten.attention import SpatioTemporalAttention
from statten.config import model_config, parse_config
from statten.factory import create_model
from statten.models.sdt import ATTENTION_V_THRESHOLD, SpikingSelfAttention
from statten.neurons import LIF

RATE = 0.2  # firing rate of the random Q, K, V spikes


def variants(T: int) -> Iterator[tuple[str, int]]:
    """(attention_mode, chunk_size): STAtten with chunks 1, 2, 4 and T (those dividing T), SDT."""
    for chunk in sorted({1, 2, 4, T}):
        if T % chunk == 0:
            yield "STAtten", chunk
    yield "SDT", 1


def token_mix(mode: str, chunk: int, shape: tuple[int, ...]) -> Callable[[], None]:
    """Forward + backward of the token mix alone on Bernoulli(RATE) spikes ``[T, B, h, N, d]``."""
    q, k, v = (torch.bernoulli(torch.full(shape, RATE)).requires_grad_() for _ in range(3))
    statten = SpatioTemporalAttention(chunk)
    talking_heads_lif = LIF(v_threshold=ATTENTION_V_THRESHOLD)
    grad = torch.randn(shape)  # dense, as in training (a .sum() would give a stride-0 gradient)

    def step() -> None:
        if mode == "STAtten":
            out = statten(q, k, v, 0.125)
        else:
            out = q * talking_heads_lif((k * v).sum(dim=-2, keepdim=True))
        out.backward(grad)

    return step


def attention_block(mode: str, chunk: int, model_kwargs: dict, batch: int) -> Callable[[], None]:
    dim, heads, T = model_kwargs["embed_dims"], model_kwargs["num_heads"], model_kwargs["T"]
    grid = model_kwargs["img_size"] // 2 ** model_kwargs["pooling_stat"].count("1")
    block = SpikingSelfAttention(dim, heads, mode, chunk, model_kwargs["dvs_mode"]).train()
    x = torch.randn(T, batch, dim, grid, grid, requires_grad=True)
    grad = torch.randn_like(x)

    def step() -> None:
        block(x).backward(grad)

    return step


def model_step(model_kwargs: dict, batch: int) -> Callable[[], None]:
    model = create_model("sdt", **model_kwargs).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size, channels = model_kwargs["img_size"], model_kwargs["in_channels"]
    images = torch.randn(batch, channels, size, size)
    targets = torch.zeros(batch, dtype=torch.long)

    def step() -> None:
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def median_times(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call, measured round-robin so that load changes hit all alike."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def rows_for(T: int, base: dict, batch: int, repeats: int) -> list[str]:
    keys, steps = [], {}
    for mode, chunk in variants(T):
        kwargs = {**base, "T": T, "chunk_size": chunk, "attention_mode": mode}
        grid = base["img_size"] // 2 ** base["pooling_stat"].count("1")
        heads = base["num_heads"]
        shape = (T, batch, heads, grid * grid, base["embed_dims"] // heads)
        key = (mode, chunk)
        keys.append(key)
        steps[f"mix{key}"] = token_mix(mode, chunk, shape)
        steps[f"block{key}"] = attention_block(mode, chunk, kwargs, batch)
        steps[f"model{key}"] = model_step(kwargs, batch)
    times = median_times(steps, repeats)
    spatial = ("STAtten", 1)
    rows = []
    for mode, chunk in keys:
        label = (
            "SDT" if mode == "SDT" else f"STAtten c={chunk}" + (" (spatial)" if chunk == 1 else "")
        )
        cells = []
        for part in ("mix", "block", "model"):
            seconds = times[f"{part}{(mode, chunk)}"]
            cells.append(f"{seconds * 1e3:,.1f} ({seconds / times[f'{part}{spatial}']:.2f})")
        rows.append(f"| {T} | {label} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default="conf/cifar10/2_512_200E_t4.yml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--time-steps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = model_config(parse_config(["-c", args.config], "train"))
    print(
        f"{args.config}, batch {args.batch}, {torch.get_num_threads()} CPU threads, eager fp32; "
        "ms per forward + backward (x spatial-only STAtten at the same T)\n"
    )
    print("| T | attention | token mix | attention block | model training step |")
    print("|---|---|---|---|---|")
    for T in args.time_steps:
        print("\n".join(rows_for(T, base, args.batch, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
