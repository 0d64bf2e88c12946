"""``statten bench --tasks attention``: STAtten versus native attention cost, for every family."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from statten import bench, list_models
from statten.analysis.attention_cost import attention_variants, chunk_sizes

TIME_STEPS = (4, 8, 16)
SMALL = ["--dim", "32", "--num-heads", "4", "--img-size", "16", "--device", "cpu"]
# Blocks per family: qkformer needs its two Q-K attention blocks before an SSA block;
# sdtv2's depth is fixed.
LAYERS = {"sdt": ["--layer", "3"], "spikformer": ["--layer", "1"], "qkformer": ["--layer", "3"]}
NATIVE = {"sdt": "SDT", "spikformer": "SSA", "qkformer": "SSA", "sdtv2": "SDSA"}
# Families whose native attention is spatial-only STAtten (SpatioTemporalAttention, chunk 1).
NATIVE_IS_SPATIAL = ("spikformer", "qkformer", "sdtv2")


def _run_attention_task(family: str, json_path: Path) -> dict[str, Any]:
    argv = ["--model", family, *SMALL, *LAYERS.get(family, []), "--tasks", "attention"]
    return bench.main([*argv, "--json", str(json_path)])


Table = tuple[dict[str, Any], dict[str, Any]]


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Table]:
    """A family's ``(returned document, document read back from --json)``, run once."""
    done: dict[str, Table] = {}

    def table(family: str) -> Table:
        if family not in done:
            path = tmp_path_factory.mktemp(family) / "bench.json"
            document = _run_attention_task(family, path)
            done[family] = document, json.loads(path.read_text())
        return done[family]

    return table


def _rows(document: dict[str, Any], T: int) -> dict[str, dict[str, Any]]:
    return {
        row["label"]: row for row in document["attention_cost"]["rows"] if row["time_steps"] == T
    }


def test_every_family_is_covered() -> None:
    assert sorted(NATIVE) == sorted(list_models())


def test_chunk_sizes_are_the_divisors_of_t() -> None:
    assert chunk_sizes(16) == [1, 2, 4, 8, 16]
    assert chunk_sizes(10) == [1, 2, 5, 10]
    labels = [v.label for v in attention_variants([4], "SSA")]
    assert labels == ["STAtten c=1 (spatial-only)", "STAtten c=2", "STAtten c=4", "SSA"]


def test_attention_is_not_a_default_task() -> None:
    assert bench.ATTENTION_TASK not in bench.TASKS


@pytest.mark.parametrize("family", sorted(NATIVE))
def test_table_has_every_time_step_and_chunk_size(family: str, tables) -> None:
    document, _ = tables(family)
    table = document["attention_cost"]
    assert table["native_attention"] == NATIVE[family]
    rows = [(r["time_steps"], r["attention"], r["chunk_size"]) for r in table["rows"]]
    expected = [
        row
        for T in TIME_STEPS
        for row in (*((T, "STAtten", c) for c in chunk_sizes(T)), (T, NATIVE[family], 1))
    ]
    assert rows == expected


@pytest.mark.parametrize("family", sorted(NATIVE))
def test_statten_costs_the_same_token_mix_at_every_chunk_size(family: str, tables) -> None:
    """The paper's claim: STAtten chunk c costs what spatial-only (chunk 1) attention costs."""
    document, _ = tables(family)
    assert document["attention_cost"]["same_cost_as_spatial"] is True
    for T in TIME_STEPS:
        rows = _rows(document, T)
        spatial = rows["STAtten c=1 (spatial-only)"]
        for c in chunk_sizes(T):
            row = rows[f"STAtten c={c}"] if c > 1 else spatial
            assert row["token_mix_flops"] == spatial["token_mix_flops"]
            assert row["forward_flops"] == spatial["forward_flops"]
            assert row["ratios"]["token_mix_flops_vs_spatial"] == 1.0


@pytest.mark.parametrize("family", sorted(NATIVE))
def test_costs_are_positive_and_kept_in_the_json(family: str, tables) -> None:
    document, written = tables(family)
    assert written["attention_cost"]["rows"] == document["attention_cost"]["rows"]
    for row in written["attention_cost"]["rows"]:
        assert row["token_mix_flops"] > 0 and row["forward_flops"] > row["token_mix_flops"]
        assert row["forward_sops"] > 0 and row["token_mix_sops"] >= 0
        assert row["forward_energy_mj"] > 0 and row["params"] > 0
        assert row["seconds_per_image"] is None  # not timed by default


@pytest.mark.parametrize("family", NATIVE_IS_SPATIAL)
def test_native_attention_is_spatial_only_statten(family: str, tables) -> None:
    """SSA and SDSA are STAtten with chunk 1: same weights, input and therefore every count."""
    document, _ = tables(family)
    for T in TIME_STEPS:
        rows = _rows(document, T)
        native, spatial = rows[NATIVE[family]], rows["STAtten c=1 (spatial-only)"]
        for key in ("params", "token_mix_flops", "token_mix_sops", "forward_flops", "forward_sops"):
            assert native[key] == spatial[key], (T, key)


def test_sdt_costs_follow_the_formulas_of_docs_profile(tables) -> None:
    """sdt, D 32, 4 heads (d 8), 3 blocks, 16 px pooled twice: N = 4 x 4 tokens. Per block,
    STAtten's token mix is 4 T N D d FLOPs, SDT's 3 T N D; everything else is the same."""
    document, _ = tables("sdt")
    blocks, D, d, N = 3, 32, 8, 16
    for T in TIME_STEPS:
        rows = _rows(document, T)
        statten, sdt = rows["STAtten c=1 (spatial-only)"], rows["SDT"]
        assert statten["token_mix_flops"] == blocks * 4 * T * N * D * d
        assert sdt["token_mix_flops"] == blocks * 3 * T * N * D
        assert statten["ratios"]["token_mix_flops_vs_native"] == pytest.approx(4 * d / 3)
        mix_difference = statten["token_mix_flops"] - sdt["token_mix_flops"]
        assert statten["forward_flops"] - sdt["forward_flops"] == mix_difference
        assert statten["params"] == sdt["params"]
