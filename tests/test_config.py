"""Configuration: recipes, strict keys, hyphen/underscore spellings, booleans, validation."""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

import statten
from statten import config as config_module
from statten.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from statten.config import (
    ConfigError,
    build_parser,
    config_from_dict,
    config_to_dict,
    model_config,
    parse_config,
    resolve_config,
    save_config,
    typed_options,
)

CONF = Path(__file__).resolve().parent.parent / "conf"
# The ten reference recipes of sdt (the other families test their own recipes).
RECIPES = sorted(
    p.relative_to(CONF).as_posix()
    for p in CONF.glob("*/*_200E_*.yml")
    if yaml.safe_load(p.read_text()).get("model") == "sdt"
)

# Every long option of the reference train.py and test.py parsers (its destination is the name
# without dashes, "-" read as "_"), and the short or alias options with their destinations.
REFERENCE_LONG_OPTIONS = """
-data-dir --dataset --train-split --val-split --train-split-path --model --pooling-stat --TET
--TET-means --TET-lamb --spike-mode --layer --in-channels --pretrained --initial-checkpoint
--resume --no-resume-opt --num-classes --time-steps --chunk-size --num-heads --patch-size
--mlp-ratio --gp --img-size --input-size --crop-pct --mean --std --interpolation --batch-size
--val-batch-size --opt --opt-eps --opt-betas --momentum --weight-decay --clip-grad --clip-mode
--sched --lr --lr-noise --lr-noise-pct --lr-noise-std --lr-cycle-mul --lr-cycle-limit
--warmup-lr --min-lr --epochs --epoch-repeats --start-epoch --decay-epochs --warmup-epochs
--cooldown-epochs --patience-epochs --decay-rate --no-aug --scale --ratio --hflip --vflip
--color-jitter --aa --aug-splits --jsd --bce-loss --bce-target-thresh --reprob --remode
--recount --resplit --mixup --cutmix --cutmix-minmax --mixup-prob --mixup-switch-prob
--mixup-mode --mixup-off-epoch --smoothing --train-interpolation --drop --drop-connect
--drop-path --drop-block --bn-tf --bn-momentum --bn-eps --sync-bn --dist-bn --split-bn
--linear-prob --model-ema --model-ema-force-cpu --model-ema-decay --seed --log-interval
--recovery-interval --checkpoint-hist --workers --save-images --amp --apex-amp --native-amp
--channels-last --pin-mem --no-prefetcher --dvs-aug --dvs-trival-aug --output --experiment
--eval-metric --tta --local_rank --use-multi-epochs-loader --torchscript --log-wandb
--attention_mode --save-qkv --large-valid --config
"""
REFERENCE_OPTIONS = {
    **{o: o.lstrip("-").replace("-", "_") for o in REFERENCE_LONG_OPTIONS.split()},
    **{"-d": "dataset", "-b": "batch_size", "-vb": "val_batch_size", "-j": "workers"},
    **{"--dr": "decay_rate", "-c": "config"},
}

# SPEC section 8 counts include 64 unused talking_heads weights per block; statten drops them.
PARAMETER_COUNTS = {
    "cifar10/2_512_200E_t4.yml": 10_233_546 - 2 * 64,
    "cifar10/2_256_200E_t4.yml": 2_567_082 - 2 * 64,
    "imagenet/8_768_200E_t4.yml": 66_339_144 - 8 * 64,
}


# Training recipes of SPEC section 8 (and the reference's effective values).
SPEC_CIFAR = {
    **{"layer": 2, "num_heads": 8, "mlp_ratio": 4, "time_steps": 4, "chunk_size": 2},
    **{"pooling_stat": "0011", "img_size": 32, "opt": "adamw", "lr": 3e-4, "weight_decay": 6e-2},
    **{"batch_size": 64, "sched": "cosine", "epochs": 200, "cooldown_epochs": 10},
    **{"warmup_epochs": 20, "warmup_lr": 1e-6, "min_lr": 1e-5, "aa": "rand-m9-n1-mstd0.4-inc1"},
    **{"mixup": 0.5, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "cutmix": 0.0},
    **{"smoothing": 0.1, "seed": 42, "amp": False, "drop_path": 0.0},
}
SPEC_IMAGENET_COMMON = {
    **{"layer": 8, "time_steps": 4, "chunk_size": 2, "pooling_stat": "1111", "img_size": 224},
    **{"opt": "lamb", "lr": 1e-3, "weight_decay": 0.01, "sched": "cosine", "epochs": 200},
    **{"cooldown_epochs": 10, "warmup_epochs": 20, "warmup_lr": 1e-5, "mixup": 0.2},
    **{"cutmix": 1.0, "smoothing": 0.1, "crop_pct": 0.95, "amp": True, "bce_loss": False},
    **{"drop_path": 0.0},
}
SPEC_IMAGENET = {
    "imagenet/8_768_200E_t4.yml": {
        **{"dim": 768, "batch_size": 64, "aa": "rand-m7-mstd0.5-inc1", "scale": [0.08, 1.0]},
        **{"mixup_prob": 1.0, "min_lr": 2e-5},
    },
    "imagenet/8_512_200E_t4.yml": {
        **{"dim": 512, "batch_size": 48, "aa": "rand-m5-mstd0.5-inc1", "scale": [0.2, 1.0]},
        **{"mixup_prob": 0.6, "min_lr": 1.5e-5},
    },
}
SPEC_EVENTS = {
    **{"layer": 2, "dim": 256, "img_size": 64, "in_channels": 2, "pooling_stat": "0011"},
    **{"opt": "adamw", "lr": 0.01, "weight_decay": 1e-4, "batch_size": 16, "warmup_epochs": 10},
    **{"warmup_lr": 1e-3, "min_lr": 3e-4, "epochs": 200, "cooldown_epochs": 10},
    **{"smoothing": 0.1, "amp": True, "hflip": 0.0, "drop_path": 0.0},
}


@pytest.fixture(autouse=True)
def no_default_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep tests independent of conf/digits/default.yml: without -c, parser defaults apply."""
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", tmp_path / "absent.yml")


def recipe(name: str, *argv: str, command: str = "train") -> argparse.Namespace:
    return parse_config(["-c", str(CONF / name), *argv], command)


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_all_ten_recipes_are_present() -> None:
    assert len(RECIPES) == 10


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("command", ["train", "test"])
def test_recipe_loads_and_builds_its_model(name: str, command: str) -> None:
    cfg = recipe(name, command=command)
    assert cfg.config == str(CONF / name)
    assert cfg.drop_path == 0.0 and cfg.attention_mode == "STAtten" and cfg.mlp_ratio == 4
    with torch.device("meta"):
        model = statten.create_model(cfg.model, **model_config(cfg))
    assert (model.T, model.num_classes) == (cfg.time_steps, cfg.num_classes)


@pytest.mark.parametrize(("name", "count"), PARAMETER_COUNTS.items())
def test_recipe_parameter_counts_match_the_reference(name: str, count: int) -> None:
    with torch.device("meta"):
        model = statten.create_model("sdt", **model_config(recipe(name)))
    assert sum(p.numel() for p in model.parameters()) == count


def settings(cfg: argparse.Namespace, expected: dict) -> dict:
    """The values of ``cfg`` for the keys of ``expected``."""
    return {key: getattr(cfg, key) for key in expected}


@pytest.mark.parametrize("name", [r for r in RECIPES if r.split("/")[0] in ("cifar10", "cifar100")])
def test_cifar_recipes_follow_spec(name: str) -> None:
    cfg = recipe(name)
    assert settings(cfg, SPEC_CIFAR) == SPEC_CIFAR
    assert cfg.dim == int(name.split("_")[1])


@pytest.mark.parametrize(("name", "specific"), SPEC_IMAGENET.items())
def test_imagenet_recipes_follow_spec(name: str, specific: dict) -> None:
    expected = {**SPEC_IMAGENET_COMMON, **specific}
    assert settings(recipe(name), expected) == expected


@pytest.mark.parametrize("name", [r for r in RECIPES if "dvs" in r or "caltech" in r])
def test_event_recipes_follow_spec(name: str) -> None:
    cfg = recipe(name)
    tet = {"TET": True, "TET_lamb": 0.001, "TET_means": 1.0} if "dvs" in name else {"TET": False}
    expected = {**SPEC_EVENTS, **tet}
    assert settings(cfg, expected) == expected
    assert (cfg.time_steps, cfg.chunk_size) in ((16, 4), (10, 5))
    assert model_config(cfg)["dvs_mode"] is True


def test_every_reference_option_keeps_its_destination() -> None:
    for command in ("train", "test"):
        parser = build_parser(command)
        dests = {o: a.dest for a in parser._actions for o in a.option_strings}
        assert {o: dests.get(o) for o in REFERENCE_OPTIONS} == REFERENCE_OPTIONS


def test_command_line_overrides_yaml() -> None:
    cfg = recipe("cifar10/2_256_200E_t4.yml", "--lr", "0.1", "-b", "8", "--dim", "128")
    assert (cfg.lr, cfg.batch_size, cfg.dim, cfg.epochs) == (0.1, 8, 128, 200)


def test_yaml_values_convert_like_flags(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yml", "lr: 3e-4\nepochs: '7'\nmean: [1, 2, 3]\nTET: 1\n")
    cfg = parse_config(["-c", path], "train")
    assert (cfg.lr, cfg.epochs, cfg.mean, cfg.TET) == (3e-4, 7, [1.0, 2.0, 3.0], True)
    assert isinstance(cfg.mean[0], float)


def test_unknown_yaml_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yml", "mlp_ration: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'mlp_ration'.*did you mean mlp_ratio"):
        parse_config(["-c", path], "train")


@pytest.mark.parametrize(
    ("option", "suggestion"),
    [("--mlp-ration", "--mlp-ratio"), ("--epoch", "--epochs"), ("--tet", "--TET")],
)
def test_unknown_option_suggests_the_closest(option: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown option {option} .*did you mean {suggestion}"):
        parse_config([option, "3"], "train")


def test_stray_argument_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unexpected argument 'cifar'"):
        parse_config(["cifar"], "train")


@pytest.mark.parametrize("spelling", ["--mlp-ratio", "--mlp_ratio", "--mlp_ratio=2"])
def test_options_accept_hyphens_and_underscores(spelling: str) -> None:
    argv = [spelling] if "=" in spelling else [spelling, "2"]
    assert parse_config(argv, "train").mlp_ratio == 2


@pytest.mark.parametrize("key", ["mlp-ratio", "mlp_ratio"])
def test_yaml_keys_accept_hyphens_and_underscores(tmp_path: Path, key: str) -> None:
    path = write_yaml(tmp_path / "c.yml", f"{key}: 2\nnum-heads: 4\ndim: 64\n")
    cfg = parse_config(["-c", path], "train")
    assert (cfg.mlp_ratio, cfg.num_heads) == (2, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mlp-ratio: 4\nmlp_ratio: 2\n", "sets 'mlp_ratio' twice"),
        ("lr: 0.1\nlr: 0.2\n", "key 'lr' is set twice"),
    ],
)
def test_a_key_given_twice_in_yaml_is_an_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(["-c", write_yaml(tmp_path / "c.yml", text)], "train")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], False),
        (["--TET"], True),
        (["--TET", "True"], True),
        (["--TET", "yes"], True),
        (["--TET", "False"], False),
        (["--TET", "false"], False),
        (["--TET", "0"], False),
        (["--TET=0"], False),
        (["--TET", "--lr", "0.1"], True),
    ],
)
def test_booleans_parse_as_booleans(argv: list[str], expected: bool) -> None:
    assert parse_config(argv, "train").TET is expected


def test_bad_boolean_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--TET: expected a boolean"):
        parse_config(["--TET", "maybe"], "train")


@pytest.mark.parametrize("flag", ["amp", "model-ema", "no-resume-opt", "pin-mem", "dry-run"])
def test_store_true_flags_work_bare(flag: str) -> None:
    assert getattr(parse_config([f"--{flag}"], "train"), flag.replace("-", "_")) is True
    assert getattr(parse_config([], "train"), flag.replace("-", "_")) is False


def test_yaml_booleans(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yml", "TET: false\namp: true\n")
    cfg = parse_config(["-c", path], "train")
    assert (cfg.TET, cfg.amp) == (False, True)


@pytest.mark.parametrize(
    "argv", [["--local_rank=3"], ["--local-rank=3"], ["--local_rank", "3"], ["--local-rank", "3"]]
)
def test_local_rank_spellings(argv: list[str]) -> None:
    assert parse_config(argv, "train").local_rank == 3
    assert build_parser("train").parse_args(argv).local_rank == 3


@pytest.mark.parametrize("option", ["--attention_mode", "--attention-mode"])
def test_attention_mode_spellings(option: str) -> None:
    assert parse_config([option, "SDT"], "test").attention_mode == "SDT"
    assert build_parser("test").parse_args([option, "SDT"]).attention_mode == "SDT"
    with pytest.raises(ConfigError, match="invalid choice"):
        parse_config([option, "obSTAtten"], "test")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-0.1"], "lr must be >= 0"),
        (["-b", "0"], "batch_size must be >= 1"),
        (["--epochs", "-1"], "epochs must be >= 0"),
        (["--time-steps", "0"], "time_steps must be >= 1"),
        (["--chunk-size", "0"], "chunk_size must be >= 1"),
        (["--time-steps", "6", "--chunk-size", "4"], "not divisible by chunk_size=4"),
        (["--dim", "100", "--num-heads", "8"], "dim=100 is not divisible by num_heads=8"),
        (["--pooling-stat", "011"], "malformed pooling_stat"),
        (["--pooling-stat", "0021"], "malformed pooling_stat"),
        (["--lr", "fast"], "invalid float value"),
        (["--drop-path", "1.5"], "drop_path must be at least 0 and below 1, got 1.5"),
        (["--drop-path", "1"], "drop_path must be at least 0 and below 1"),
        (["--smoothing", "-0.1"], "smoothing must be at least 0 and below 1"),
        (["--hflip", "2"], "hflip must be between 0 and 1"),
        (["--aug-splits", "1"], "aug_splits must be 0 \\(off\\) or >= 2, got 1"),
        (["--num-classes", "0"], "num_classes must be >= 1"),
        (["--checkpoint-hist", "0"], "checkpoint_hist must be >= 1"),
        (["--dist-timeout", "0"], "dist_timeout must be >= 1"),
        (["--clip-grad", "-1"], "clip_grad must be >= 0"),
        (["--opt", "adamx"], "--opt 'adamx': Optimizer adamx not found"),
        (["--sched", "cosin"], "--sched 'cosin': Unknown scheduler 'cosin'"),
        (["--sched", "none"], "--sched none is not supported"),
        (["--clip-mode", "nrom"], "invalid choice: 'nrom'"),
        (["--mixup-mode", "batches"], "invalid choice: 'batches'"),
        (["--dist-bn", "mean"], "invalid choice: 'mean'"),
        (["--model", "resnet"], "invalid choice: 'resnet'"),
    ],
)
def test_invalid_values_raise(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, "train")


def test_chunk_size_need_not_divide_time_steps_for_sdt() -> None:
    assert parse_config(["--attention-mode", "SDT", "--time-steps", "5"], "train").time_steps == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pooling_stat: 0011\n", "malformed pooling_stat"),  # unquoted: YAML reads an integer
        ("epochs: 2.5\n", "expected an integer"),
        ("batch_size: true\n", "expected an integer, got True"),
        ("mean: 0.5\n", "expected a list"),
        ("input_size: [3, 32]\n", "expected 3 values"),
        ("attention_mode: stat\n", "is not one of"),
        ("- lr\n", "must hold a mapping"),
        ("lr: [\n", "cannot parse"),
    ],
)
def test_invalid_yaml_values_raise(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(["-c", write_yaml(tmp_path / "c.yml", text)], "train")


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["-c", str(tmp_path / "nope.yml")], "train")


def test_without_config_the_default_recipe_applies_when_present(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert parse_config([], "train").config is None
    default = tmp_path / "default.yml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", default)
    write_yaml(default, "dataset: digits\nnum_classes: 10\n")
    cfg = parse_config(["--lr", "0.5"], "train")
    assert (cfg.config, cfg.dataset, cfg.num_classes, cfg.lr) == (None, "digits", 10, 0.5)


def test_unknown_command_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown command"):
        build_parser("predict")


def _only_plain_data(value: object) -> bool:
    if isinstance(value, list):
        return all(_only_plain_data(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


@pytest.mark.parametrize("name", RECIPES)
def test_dict_round_trip(name: str) -> None:
    cfg = recipe(name, "--TET", "false", "--resume", "x.pth")
    cfg.world_size = 4  # attributes a trainer adds are not flags and stay out of the dict
    values = config_to_dict(cfg)
    assert "world_size" not in values and all(_only_plain_data(v) for v in values.values())
    restored = config_from_dict(yaml.safe_load(yaml.safe_dump(values)), "test")
    del cfg.world_size
    assert vars(restored) == vars(cfg)
    assert pickle.loads(pickle.dumps(values)) == values


def test_config_from_dict_uses_parser_defaults_and_checks_keys() -> None:
    cfg = config_from_dict({"time-steps": 8, "dim": 64}, "train")
    assert (cfg.time_steps, cfg.dim, cfg.lr) == (8, 64, 0.01)
    with pytest.raises(ConfigError, match="unknown key 'dvs_mode'"):
        config_from_dict({"dvs_mode": True}, "train")
    with pytest.raises(ConfigError, match="not divisible"):
        config_from_dict({"time_steps": 3}, "train")


def test_save_config_writes_a_loadable_args_yaml(tmp_path: Path) -> None:
    cfg = recipe("ncaltech101/2_256_200E_t10.yml", "--seed", "7")
    save_config(cfg, tmp_path)
    reloaded = parse_config(["-c", str(tmp_path / "args.yaml")], "test")
    assert vars(reloaded) | {"config": cfg.config} == vars(cfg)
    save_config(cfg, tmp_path / "run" / "other.yaml")
    assert yaml.safe_load((tmp_path / "run" / "other.yaml").read_text())["seed"] == 7


def test_model_config_maps_flags_to_model_arguments() -> None:
    cfg = recipe("cifar10-dvs/2_256_200E_t16_TET.yml", "--drop-path", "0.1")
    assert model_config(cfg) == {
        "img_size": 64,
        "in_channels": 2,
        "num_classes": 10,
        "embed_dims": 256,
        "num_heads": 8,
        "depths": 2,
        "mlp_ratio": 4,
        "T": 16,
        "chunk_size": 4,
        "pooling_stat": "0011",
        "attention_mode": "STAtten",
        "spike_mode": "lif",
        "dvs_mode": True,
        "TET": True,
        "drop_path_rate": 0.1,
    }
    assert "img_size" not in model_config(parse_config([], "train"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available here"):
        parse_config(["--device", "cuda"], "train")


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(ConfigError, match="invalid --device 'cdua'"):
        parse_config(["--device", "cdua"], "train")


def test_bf16_autocast_is_reachable_from_the_command_line() -> None:
    assert parse_config(["--amp", "--amp-dtype", "bfloat16"], "train").amp_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="invalid choice"):
        parse_config(["--amp-dtype", "int8"], "train")


@pytest.mark.parametrize("key", ["--output", "--json"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path, key: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "sub" / ("out.json" if key == "--json" else "")
    with pytest.raises(ConfigError, match="cannot write there"):
        parse_config([key, str(target)], "test")
    assert parse_config([key, str(tmp_path / "new" / "out.json")], "test")  # created later


def _statten_checkpoint(path: Path, **settings: object) -> str:
    """A checkpoint file of statten's format whose stored run configuration has ``settings``."""
    stored = config_to_dict(config_from_dict({"device": "cpu", **settings}, "train"))
    save_checkpoint({"format": CHECKPOINT_FORMAT, "config": stored}, path)
    return str(path)


def test_a_typed_flag_equal_to_its_default_overrides_the_checkpoint(tmp_path: Path) -> None:
    """`statten test --resume C --dataset digits` evaluates on digits even though digits is the
    default: typed flags are found by what was typed, not by comparing values."""
    checkpoint = _statten_checkpoint(
        tmp_path / "c.pth.tar", dataset="torch/cifar10", smoothing=0.2, seed=7
    )
    argv = ["--resume", checkpoint, "--dataset", "digits", "--smoothing", "0.1"]
    cfg = resolve_config(argv, "test")
    assert (cfg.dataset, cfg.smoothing, cfg.seed) == ("digits", 0.1, 7)
    assert typed_options(argv, "test") == {
        "resume": checkpoint, "dataset": "digits", "smoothing": 0.1
    }  # fmt: skip


def test_train_resume_continues_with_the_stored_configuration(tmp_path: Path) -> None:
    checkpoint = _statten_checkpoint(tmp_path / "c.pth.tar", batch_size=64, lr=0.5, epochs=3)
    cfg = resolve_config(["--resume", checkpoint, "--epochs", "5"], "train")
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.resume) == (64, 0.5, 5, checkpoint)


def test_the_machine_settings_are_not_taken_from_a_checkpoint(tmp_path: Path) -> None:
    checkpoint = _statten_checkpoint(tmp_path / "c.pth.tar", local_rank=3)
    stored = torch.load(checkpoint, weights_only=True)
    stored["config"]["device"] = "cuda:7"
    save_checkpoint(stored, checkpoint)
    cfg = resolve_config(["--resume", checkpoint], "test")
    assert (cfg.device, cfg.local_rank) == (build_parser("test").get_default("device"), 0)


def test_a_config_file_replaces_the_stored_configuration(tmp_path: Path) -> None:
    checkpoint = _statten_checkpoint(tmp_path / "c.pth.tar", batch_size=64)
    recipe = tmp_path / "r.yml"
    recipe.write_text("batch_size: 8\n")
    assert resolve_config(["--resume", checkpoint, "-c", str(recipe)], "train").batch_size == 8


def test_a_stale_stored_configuration_names_the_checkpoint(tmp_path: Path) -> None:
    checkpoint = _statten_checkpoint(tmp_path / "c.pth.tar")
    stored = torch.load(checkpoint, weights_only=True)
    stored["config"]["retired_option"] = 1
    save_checkpoint(stored, checkpoint)
    with pytest.raises(ConfigError, match=f"stored in {checkpoint}: unknown key 'retired_option'"):
        resolve_config(["--resume", checkpoint], "test")


@pytest.mark.parametrize(
    "argv",
    [["--pretrained"], ["--tta", "2"], ["--torchscript"], ["--log-wandb"], ["--jsd"],
     ["--drop", "0.1"], ["--bn-eps", "1e-3"], ["--epoch-repeats", "2"], ["--save-qkv"]],
)  # fmt: skip
def test_reference_flags_statten_does_not_implement_are_refused_when_set(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match=f"{argv[0]} is not supported: "):
        parse_config(argv, "test")


# Flags that are accepted and have nothing to do here: launchers set --local-rank (statten reads
# LOCAL_RANK), statten's loaders have no prefetcher to disable, -c and --debug act in the CLI.
NOTHING_TO_DO = {"local_rank", "no_prefetcher", "config", "debug"}


def test_every_flag_is_read_or_refused() -> None:
    """No flag is parsed and then ignored: each is read by the package (or by timm's optimizer
    and scheduler arguments), or refused when set (UNSUPPORTED), or has nothing to do."""
    import inspect

    from timm.optim import optimizer_kwargs
    from timm.scheduler import scheduler_kwargs

    package = Path(statten.__file__).parent
    sources = [p.read_text() for p in package.rglob("*.py") if p.name != "config.py"]
    sources += [inspect.getsource(optimizer_kwargs), inspect.getsource(scheduler_kwargs)]
    text, config_text = "\n".join(sources), Path(config_module.__file__).read_text()

    def read(dest: str) -> bool:
        return bool(
            re.search(rf"(cfg\.|args\.|[\"']){dest}\b", text)
            or re.search(rf"cfg\.{dest}\b", config_text)
        )

    ignored = [
        action.dest
        for action in build_parser("train")._actions
        if action.dest not in {"help", *NOTHING_TO_DO, *config_module.UNSUPPORTED}
        and not read(action.dest)
    ]
    assert ignored == []


def test_apex_and_native_amp_mean_amp() -> None:
    assert parse_config(["--apex-amp"], "train").amp is True
    assert parse_config(["--native-amp"], "train").amp is True
    assert parse_config([], "train").amp is False
