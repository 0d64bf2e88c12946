"""statten train / statten test end to end on the embedded digits (CPU, small models)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from statten import list_models
from statten.checkpoint import read_checkpoint
from statten.cli import main
from statten.config import ConfigError, parse_config
from statten.engine.distributed import DistributedContext
from statten.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
# The digits recipe's model on batches of 64: an epoch is 22 steps, about 2 s on 2 cores.
SMALL = [
    "--dim", "64", "--num-heads", "8", "--layer", "1", "--img-size", "16",
    "--batch-size", "64", "--workers", "0", "--device", "cpu", "--warmup-epochs", "0",
]  # fmt: skip


def train(tmp_path: Path, *args: str, name: str = "run") -> Path:
    assert main(["train", *SMALL, "--output", str(tmp_path), "--experiment", name, *args]) == 0
    return tmp_path / "train" / name


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_default_recipe_learns_digits_on_a_short_budget(tmp_path: Path) -> None:
    """The default recipe (statten train with no arguments) trimmed to 6 epochs."""
    args = ["--epochs", "6", "--output", str(tmp_path), "--experiment", "default"]
    assert main(["train", "--device", "cpu", *args]) == 0
    run = tmp_path / "train" / "default"
    rows = (run / "summary.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr"
    assert len(rows) == 7
    assert float(rows[-1].split(",")[3]) >= 90.0
    for name in ("args.yaml", "log.txt", "last.pth.tar", "model_best.pth.tar"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    checkpoint = read_checkpoint(run / "last.pth.tar")
    assert checkpoint["config"]["dataset"] == "digits"
    assert checkpoint["model_config"]["embed_dims"] == 64


@pytest.mark.parametrize(("metric", "column", "best"), [("loss", 2, min), ("top1", 3, max)])
def test_eval_metric_keeps_the_best_checkpoint(
    tmp_path: Path, metric: str, column: int, best: Callable
) -> None:
    """Loss ranks lowest first (as timm's CheckpointSaver); accuracy highest first."""
    run = train(tmp_path, "--epochs", "3", "--eval-metric", metric, "--checkpoint-hist", "1")
    rows = [r.split(",") for r in (run / "summary.csv").read_text().splitlines()[1:]]
    assert read_checkpoint(run / "model_best.pth.tar")["metric"] == best(
        float(r[column]) for r in rows
    )


def test_unknown_eval_metric_is_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="unknown eval_metric 'top3'"):
        parse_config(["--eval-metric", "top3"], "train")


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path: Path) -> None:
    straight = train(tmp_path / "a", "--epochs", "2", "--checkpoint-hist", "2")
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copy(straight / "checkpoint-0.pth.tar", resumed_dir / "after-epoch-0.pth.tar")
    resume = ["--resume", str(resumed_dir / "after-epoch-0.pth.tar")]
    assert main(["train", *SMALL, "--epochs", "2", "--checkpoint-hist", "2", *resume]) == 0
    a, b = read_checkpoint(straight / "last.pth.tar"), read_checkpoint(resumed_dir / "last.pth.tar")
    assert a["progress"] == b["progress"]
    assert_identical(a["state_dict"], b["state_dict"])
    for x, y in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert_identical(x, y)


def test_memory_efficient_training_ends_on_the_same_weights(tmp_path: Path) -> None:
    plain = train(tmp_path, "--epochs", "1", "--memory-efficient", "false", name="plain")
    lean = train(tmp_path, "--epochs", "1", "--memory-efficient", name="lean")
    assert read_checkpoint(lean / "last.pth.tar")["config"]["memory_efficient"] is True
    assert_identical(weights(plain / "last.pth.tar"), weights(lean / "last.pth.tar"))
    assert (plain / "summary.csv").read_text() == (lean / "summary.csv").read_text()


def test_sigkill_mid_epoch_resumes_from_recovery_and_never_truncates(tmp_path: Path) -> None:
    statten = shutil.which("statten", path=str(Path(sys.executable).parent))
    run = tmp_path / "train" / "killed"
    args = [*SMALL, "--epochs", "2", "--recovery-interval", "5", "--output", str(tmp_path)]
    process = subprocess.Popen(
        [statten, "train", *args, "--experiment", "killed"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (run / "recovery.pth.tar").exists():
            assert process.poll() is None, "training ended before writing a recovery checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    for path in run.glob("*.pth.tar"):
        read_checkpoint(path)  # raises on a truncated file
    recovery = read_checkpoint(run / "recovery.pth.tar")
    assert recovery["progress"]["batch_in_epoch"] > 0
    assert main(["train", *SMALL, "--epochs", "2", "--resume", str(run / "recovery.pth.tar")]) == 0
    final = read_checkpoint(run / "last.pth.tar")
    assert final["progress"]["epoch"] == 2
    assert not (run / "recovery.pth.tar").exists()
    assert not list(run.glob("*.tmp-*"))


@pytest.mark.parametrize(
    ("family", "dist_bn"),
    [(family, "" if family == "sdt" else "reduce") for family in list_models()],
)
def test_two_process_ddp_on_cpu_ends_with_identical_weights(
    tmp_path: Path, family: str, dist_bn: str
) -> None:
    """Weights and the BatchNorm statistics every rank evaluated with are the saved ones."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).parent / "ddp_worker.py"), str(tmp_path),
        *SMALL, "--model", family, "--epochs", "1", "--dist-bn", dist_bn,
        "--dim", "32", "--num-heads", "4", "--layer", "3",  # qkformer's fewest blocks: 2 + 1
        "--output", str(tmp_path), "--experiment", "ddp",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_identical(rank0, rank1)
    assert_identical(rank0, weights(tmp_path / "train" / "ddp" / "last.pth.tar"))


def test_two_process_statten_test_reports_the_firing_rates_of_all_samples(tmp_path: Path) -> None:
    checkpoint = str(DATA / "static_statten_official_format.pth.tar")
    args = ["--resume", checkpoint, "--dataset", "digits", "--img-size", "32"]
    args += ["--in-channels", "3", "--device", "cpu", "--workers", "0"]
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    assert main(["test", *args, "--json", str(single)]) == 0
    statten = shutil.which("statten", path=str(Path(sys.executable).parent))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        statten, "test", *args, "--json", str(double),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["samples"] == one["samples"] == 360
    assert two["top1"] == pytest.approx(one["top1"])
    for name, rates in one["firing_rates"].items():  # each rank saw half: summed, not averaged
        assert two["firing_rates"][name] == pytest.approx(rates, rel=1e-9, abs=1e-12), name


# The recipes of sdt, the model the STAtten reference's command lines train.
RECIPES = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "conf").glob("*/*.yml")
    if yaml.safe_load(p.read_text()).get("model") == "sdt"
)
SEED_FLAGS = ["--model", "sdt", "--spike-mode", "lif", "--attention_mode", "STAtten"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_reference_seed_command_lines_parse_and_build(
    recipe: str, capsys: pytest.CaptureFixture
) -> None:
    config = str(ROOT / recipe)
    assert main(["train", "-c", config, *SEED_FLAGS, "--local-rank=0", "--dry-run"]) == 0
    assert main(["train", "-c", config, *SEED_FLAGS, "--local_rank", "0", "--dry-run"]) == 0
    test_line = ["-c", config, *SEED_FLAGS, "--resume", "CKPT", "--no-resume-opt", "--dry-run"]
    assert main(["test", *test_line]) == 0
    assert '"parameters"' in capsys.readouterr().out


def test_torch_distributed_launch_seed_line_runs(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=1",
        str(ROOT / "train.py"), "-c", str(ROOT / "conf/cifar10/2_512_200E_t4.yml"),
        *SEED_FLAGS, "--dry-run",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"embed_dims": 512' in result.stdout


def test_reference_checkpoint_evaluates_through_statten_test(tmp_path: Path) -> None:
    report = tmp_path / "metrics.json"
    checkpoint = str(DATA / "static_statten_official_format.pth.tar")
    args = ["--resume", checkpoint, "--dataset", "digits", "--img-size", "32"]
    args += ["--in-channels", "3", "--device", "cpu", "--json", str(report)]
    assert main(["test", *args]) == 0
    import json

    metrics = json.loads(report.read_text())
    assert metrics["samples"] == 360
    assert 0 <= metrics["top1"] <= 100 and metrics["top5"] >= metrics["top1"]
    rates = metrics["firing_rates"]
    assert "block.1.attn.attn_lif" in rates and len(rates["head_lif"]) == 4


def test_statten_test_fast_inference_agrees_with_the_plain_model(tmp_path: Path) -> None:
    checkpoint = str(DATA / "static_statten_official_format.pth.tar")
    args = ["--resume", checkpoint, "--dataset", "digits", "--img-size", "32"]
    args += ["--in-channels", "3", "--device", "cpu"]
    reports = {}
    for name, extra in (("plain", []), ("fast", ["--fast-inference"])):
        reports[name] = tmp_path / f"{name}.json"
        assert main(["test", *args, *extra, "--json", str(reports[name])]) == 0
    import json

    plain, fast = (json.loads(reports[name].read_text()) for name in ("plain", "fast"))
    assert fast["top1"] == pytest.approx(plain["top1"], abs=100 / 360)  # at most one sample
    assert fast["firing_rates"].keys() == plain["firing_rates"].keys()
    for name, rates in plain["firing_rates"].items():
        assert fast["firing_rates"][name] == pytest.approx(rates, abs=1e-3), name


def test_statten_test_of_own_checkpoint_needs_no_config(tmp_path: Path) -> None:
    run = train(tmp_path, "--epochs", "1")
    report = tmp_path / "metrics.json"
    assert main(["test", "--resume", str(run / "last.pth.tar"), "--json", str(report)]) == 0
    import json

    metrics = json.loads(report.read_text())
    summary = (run / "summary.csv").read_text().splitlines()[-1].split(",")
    assert metrics["top1"] == pytest.approx(float(summary[3]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-0.1"], "lr must be >= 0"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--time-steps", "4", "--chunk-size", "3"], "not divisible by chunk_size=3"),
        (["--dataset", "imagenet", "--data-dir", "/nonexistent"], "/nonexistent"),
        (["--mlp_ratoi", "4"], "mlp-ratio"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert main(["train", *SMALL, "--output", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("statten train: error:") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_mismatched_checkpoint_names_the_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = str(DATA / "static_statten_official_format.pth.tar")
    assert main(["train", *SMALL, "--output", str(tmp_path), "--resume", checkpoint]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint}: checkpoint does not fit the model" in err
    assert "patch_embed.proj_conv.weight" in err
    with pytest.raises(Exception, match="does not fit"):
        main(["train", *SMALL, "--output", str(tmp_path), "--resume", checkpoint, "--debug"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = train(tmp_path, "--epochs", "1")
    good = weights(run / "last.pth.tar")

    def diverging(cfg, mixup_active):
        return lambda logits, target: logits.sum() * float("nan")

    monkeypatch.setattr("statten.engine.trainer.create_train_criterion", diverging)
    assert main(["train", *SMALL, "--epochs", "2", "--resume", str(run / "last.pth.tar")]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "last.pth.tar" in err
    assert_identical(weights(run / "last.pth.tar"), good)


def test_linear_prob_freezes_the_patch_embedding(tmp_path: Path) -> None:
    run = train(tmp_path, "--epochs", "1", "--linear-prob")
    after = weights(run / "last.pth.tar")
    cfg = parse_config([*SMALL, "--linear-prob"], "train")
    initial = Trainer(cfg, DistributedContext(0, 1, 0, torch.device("cpu"))).model.state_dict()
    frozen = [k for k in after if k.startswith("patch_embed.") and k.endswith("weight")]
    assert frozen and all(torch.equal(after[k], initial[k]) for k in frozen)
    assert not torch.equal(after["head.weight"], initial["head.weight"])


def test_mixup_stops_at_mixup_off_epoch(tmp_path: Path) -> None:
    """The reference recipes switch mixup off (CIFAR: epoch 200, DVS: 75); targets stay smoothed."""
    cfg = parse_config([*SMALL, "--mixup", "0.5", "--mixup-off-epoch", "2"], "train")
    trainer = Trainer(cfg, DistributedContext(0, 1, 0, torch.device("cpu")))
    trainer.build_data()
    enabled = []
    for epoch in range(4):
        trainer.switch_mixup(epoch)
        enabled.append(trainer.mixup_fn.mixup_enabled)
    assert enabled == [True, True, False, False]
    images, targets = next(iter(trainer.train_loader))
    mixed_images, soft = trainer.mixup_fn(images.clone(), targets)
    assert torch.equal(mixed_images, images)  # not mixed
    assert soft.max().item() == pytest.approx(0.9 + 0.1 / 10)  # smoothing 0.1 stays


def test_a_failed_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Disk full in the second epoch's save: exit 2 with one line; epoch 0's files intact."""
    real_save, calls = torch.save, []

    def save(obj: object, f: object) -> None:
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint written: epoch 1's
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    args = ["--epochs", "2", "--recovery-interval", "0", "--output", str(tmp_path)]
    assert main(["train", *SMALL, *args, "--experiment", "full"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    run = tmp_path / "train" / "full"
    assert read_checkpoint(run / "last.pth.tar")["progress"]["epoch"] == 1  # epoch 0's save
    assert not list(run.glob("*.tmp-*"))


def test_each_epoch_is_serialised_once_and_linked_as_best(tmp_path: Path) -> None:
    run = train(tmp_path, "--epochs", "1", "--checkpoint-hist", "1")
    last, best, kept = (run / n for n in ("last.pth.tar", "model_best.pth.tar",
                                          "checkpoint-0.pth.tar"))  # fmt: skip
    assert last.stat().st_ino == best.stat().st_ino == kept.stat().st_ino
    assert last.stat().st_nlink == 3


def test_train_resume_needs_only_the_checkpoint(tmp_path: Path) -> None:
    """A resumed run continues with the configuration it was started with (not the recipe's)."""
    run = train(tmp_path, "--epochs", "1", "--smoothing", "0.2")
    resume = ["--resume", str(run / "last.pth.tar"), "--epochs", "2", "--device", "cpu"]
    assert main(["train", *resume]) == 0
    final = read_checkpoint(run / "last.pth.tar")
    assert final["progress"]["epoch"] == 2
    assert (final["config"]["smoothing"], final["config"]["batch_size"]) == (0.2, 64)


def test_start_epoch_begins_there_with_the_schedule_moved(tmp_path: Path) -> None:
    run = train(tmp_path, "--epochs", "3", "--start-epoch", "2", "--log-interval", "5")
    rows = (run / "summary.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["2"]
    assert read_checkpoint(run / "last.pth.tar")["progress"]["epoch"] == 3
    log = (run / "log.txt").read_text()
    assert "[5/22]" in log and "[20/22]" in log and "[3/22]" not in log  # --log-interval 5


def test_bn_momentum_reaches_every_batchnorm() -> None:
    cfg = parse_config([*SMALL, "--bn-momentum", "0.3"], "train")
    with torch.device("meta"):
        trainer = Trainer(cfg, DistributedContext(0, 1, 0, torch.device("meta")))
    norms = [m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.3 for m in norms)


def test_amp_on_cpu_trains_in_fp32_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config([*SMALL, "--amp"], "train")
    with caplog.at_level("WARNING", logger="statten.train"):
        trainer = Trainer(cfg, DistributedContext(0, 1, 0, torch.device("cpu")))
    assert "--amp applies on CUDA only: training on cpu in fp32" in caplog.text
    assert trainer.scaler is None


@pytest.mark.parametrize(("flag", "lean"), [([], True), (["--memory-efficient", "false"], False)])
def test_memory_efficient_is_the_default_and_can_be_turned_off(flag: list[str], lean: bool) -> None:
    cfg = parse_config([*SMALL, *flag], "train")
    with torch.device("meta"):
        trainer = Trainer(cfg, DistributedContext(0, 1, 0, torch.device("meta")))
    assert trainer.model.memory_efficient is lean


def test_spike_driven_flag_reaches_the_model() -> None:
    cfg = parse_config([*SMALL, "--spike-driven"], "train")
    with torch.device("meta"):
        trainer = Trainer(cfg, DistributedContext(0, 1, 0, torch.device("meta")))
    assert trainer.model.spike_driven


def test_spike_driven_training_follows_the_exact_run(tmp_path: Path) -> None:
    """Spike-driven training saves the same checkpoints and learns as the exact path does."""
    run = train(tmp_path, "--epochs", "2", "--spike-driven")
    exact = train(tmp_path, "--epochs", "2", name="exact")
    checkpoint = read_checkpoint(run / "last.pth.tar")
    assert checkpoint["config"]["spike_driven"] is True
    assert checkpoint["state_dict"].keys() == weights(exact / "last.pth.tar").keys()
    losses = [
        [float(row.split(",")[1]) for row in (path / "summary.csv").read_text().splitlines()[1:]]
        for path in (run, exact)
    ]
    assert losses[0][-1] < 0.8 * losses[0][0]  # it learns
    assert losses[0][-1] == pytest.approx(losses[1][-1], rel=0.05)
