"""statten.data: digits, the timm ImageFolder pipeline, epoch-reproducible sampling, errors."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import statten
from statten.config import ConfigError, parse_config
from statten.data import (
    CorruptSampleError,
    DatasetNotFoundError,
    DatasetSpec,
    build_dataset,
    create_datasets,
    create_loaders,
    data_config,
    set_epoch,
)

RANDAUGMENT = "rand-m9-n1-mstd0.4-inc1"


def digits_cfg(**overrides: object) -> Namespace:
    return Namespace(**{"dataset": "digits", "batch_size": 32, "seed": 7, **overrides})


def batch_order(loader: torch.utils.data.DataLoader) -> list[list[int]]:
    """The index batches of one pass over ``loader`` (advances its sampler by one epoch)."""
    return [list(batch) for batch in loader.batch_sampler]


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/{train,val}/{cat,dog}/*.png``: 4 tiny random RGB images per class and split."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def write_tree(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/<i>.png``: ``counts[split][class]`` tiny random RGB images."""
    rng = np.random.default_rng(0)
    for split, classes in counts.items():
        for label, count in classes.items():
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def folder_cfg(root: Path, **overrides: object) -> Namespace:
    values = {"dataset": "", "data_dir": str(root), "img_size": 8, "batch_size": 2, "seed": 0}
    return Namespace(**{**values, **overrides})


def labels(dataset: torch.utils.data.Dataset) -> dict[str, int]:
    """``{class folder: label}`` of an image folder dataset's samples."""
    return {Path(path).parent.name: label for path, label in dataset.samples}


def test_digits_shapes_labels_and_normalisation() -> None:
    train, evaluation = create_datasets(digits_cfg(no_aug=True))
    assert (len(train), len(evaluation)) == (1437, 360)
    image, label = evaluation[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int)
    train_images = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(train_images.mean().item()) < 1e-4
    assert abs(train_images.std().item() - 1) < 1e-4
    counts = torch.bincount(evaluation.labels, minlength=10)
    assert counts.sum() == 360 and counts.min() >= 35  # stratified: about 36 per class


def test_digits_data_config_and_channels() -> None:
    config = data_config(digits_cfg())
    assert config["input_size"] == (1, 32, 32) and len(config["mean"]) == 1
    _, evaluation = create_datasets(digits_cfg(in_channels=3, img_size=16))
    image, _ = evaluation[0]
    assert image.shape == (3, 16, 16)
    assert torch.equal(image[0], image[2])


def test_digits_split_independent_of_seed() -> None:
    train_a, eval_a = create_datasets(digits_cfg(seed=1))
    train_b, eval_b = create_datasets(digits_cfg(seed=2))
    assert torch.equal(eval_a.images, eval_b.images)
    assert torch.equal(train_a.labels, train_b.labels)
    assert torch.equal(eval_a.labels, eval_b.labels)


def test_digits_train_augmentation_moves_pixels_eval_does_not() -> None:
    train, evaluation = create_datasets(digits_cfg())
    torch.manual_seed(0)
    assert not torch.equal(train[0][0], train[0][0])
    assert torch.equal(evaluation[0][0], evaluation[0][0])


def test_digits_loaders_batches_and_mixup() -> None:
    train_loader, eval_loader, mixup_fn = create_loaders(digits_cfg(mixup=0.8, cutmix=1.0))
    images, targets = next(iter(train_loader))
    assert images.shape == (32, 1, 32, 32) and targets.dtype == torch.int64
    mixed, soft = mixup_fn(images, targets)
    assert mixed.shape == images.shape and soft.shape == (32, 10)
    assert torch.allclose(soft.sum(1), torch.ones(32))
    assert len(train_loader) == 1437 // 32  # drop_last
    assert sum(len(t) for _, t in eval_loader) == 360
    assert eval_loader.batch_size == 32
    for name in ("validation_batch_size", "val_batch_size"):
        assert create_loaders(digits_cfg(**{name: 50}))[1].batch_size == 50
    assert create_loaders(digits_cfg())[2] is None


def test_train_order_of_epoch_k_reproduced_by_fresh_loader() -> None:
    uninterrupted, _, _ = create_loaders(digits_cfg())
    orders = [batch_order(uninterrupted) for _ in range(3)]  # epochs 0, 1, 2 without set_epoch
    assert orders[0] != orders[1] != orders[2]
    resumed, _, _ = create_loaders(digits_cfg())
    set_epoch(resumed, 2)
    assert batch_order(resumed) == orders[2]
    set_epoch(uninterrupted, 1)
    assert batch_order(uninterrupted) == orders[1]
    other_seed, _, _ = create_loaders(digits_cfg(seed=8))
    assert batch_order(other_seed) != orders[0]


def test_resumed_loader_yields_identical_batches() -> None:
    cfg = digits_cfg(no_aug=True, batch_size=128)
    uninterrupted, _, _ = create_loaders(cfg)
    for _ in range(2):
        batch_order(uninterrupted)
    resumed, _, _ = create_loaders(cfg)
    set_epoch(resumed, 2)
    for (x_a, y_a), (x_b, y_b) in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)


def test_distributed_train_ranks_split_the_epoch() -> None:
    shares = []
    for rank in (0, 1):
        cfg = digits_cfg(distributed=True, world_size=2, rank=rank)
        loader, eval_loader, _ = create_loaders(cfg)
        set_epoch(loader, 3)
        shares.append(list(loader.sampler))
        assert len(eval_loader.sampler) == 180
    assert len(shares[0]) == len(shares[1]) == 719  # 1437 samples, padded with one repeat
    assert len(set(shares[0]) | set(shares[1])) == 1437


def test_repeated_augmentation_sampler() -> None:
    loader, _, _ = create_loaders(digits_cfg(aug_repeats=3))
    epoch_0 = list(loader.sampler)
    assert epoch_0[0] == epoch_0[1] == epoch_0[2]
    resumed, _, _ = create_loaders(digits_cfg(aug_repeats=3))
    set_epoch(resumed, 1)
    assert list(resumed.sampler) == list(loader.sampler) != epoch_0


def test_digits_batch_runs_through_model() -> None:
    loader, _, _ = create_loaders(digits_cfg(batch_size=2))
    model = statten.create_model("sdt", in_channels=1, embed_dims=32, num_heads=2, depths=1, T=2)
    images, _ = next(iter(loader))
    assert model(images).shape == (2, 10)


def test_image_folder_through_timm_pipeline(image_tree: Path) -> None:
    cfg = Namespace(
        dataset="",
        data_dir=str(image_tree),
        batch_size=4,
        img_size=32,
        aa=RANDAUGMENT,
        reprob=0.25,
        mixup=0.8,
        cutmix=1.0,
        num_classes=2,
    )
    train_loader, eval_loader, mixup_fn = create_loaders(cfg)  # val_split "validation" -> val/
    images, targets = next(iter(train_loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() < 0  # normalised, not in [0, 1]
    mixed, soft = mixup_fn(images, targets)
    assert mixed.shape == images.shape and soft.shape == (4, 2)
    eval_images, eval_targets = next(iter(eval_loader))
    assert eval_images.shape == (4, 3, 32, 32) and eval_targets.tolist() == [0, 0, 0, 0]


def test_image_folder_aug_splits_concatenated(image_tree: Path) -> None:
    cfg = Namespace(dataset="", data_dir=str(image_tree), batch_size=4, img_size=32, aug_splits=2)
    images, targets = next(iter(create_loaders(cfg)[0]))
    assert images.shape == (8, 3, 32, 32)
    assert torch.equal(targets[:4], targets[4:])


@pytest.mark.parametrize("dataset", ["", "imagenet"])
def test_missing_data_dir_explains_layout(tmp_path: Path, dataset: str) -> None:
    missing = tmp_path / "imagenet"
    with pytest.raises(DatasetNotFoundError) as info:
        create_datasets(Namespace(dataset=dataset, data_dir=str(missing)))
    message = str(info.value)
    assert str(missing / "train") in message
    assert "DIR/train/<class>/*.JPEG" in message and "DIR/val/<class>/*.JPEG" in message
    assert "--data-dir" in message and "\n" not in message


def test_missing_val_split_names_both_candidates(image_tree: Path, tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "0.png").write_bytes(
        (image_tree / "train/cat/0.png").read_bytes()
    )
    with pytest.raises(DatasetNotFoundError, match=r"validation'? or .*val'"):
        create_datasets(Namespace(dataset="", data_dir=str(tmp_path), img_size=32))


def test_empty_split_folder(tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images in"):
        create_datasets(Namespace(dataset="", data_dir=str(tmp_path)))


@pytest.mark.parametrize("dataset", ["torch/cifar10", "torch/cifar100"])
def test_cifar_without_download(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(DatasetNotFoundError, match="--dataset-download") as info:
        create_datasets(Namespace(dataset=dataset, data_dir=str(tmp_path)))
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("dataset", ["cifar10-dvs", "ncaltech101"])
def test_event_datasets_need_a_data_dir(dataset: str) -> None:
    with pytest.raises(DatasetNotFoundError, match="needs --data-dir"):
        create_datasets(Namespace(dataset=dataset))


def test_unknown_dataset() -> None:
    with pytest.raises(DatasetNotFoundError, match="unknown dataset 'mnist'"):
        create_datasets(Namespace(dataset="mnist"))


@pytest.mark.parametrize(
    ("dataset", "split", "message"),
    [
        ("digits", {"train_split": "trian"}, "--train-split 'trian': digits has a fixed train"),
        ("torch/cifar10", {"train_split": "trian"}, "one of train, training"),
        ("torch/cifar10", {"val_split": "vaildation"}, "fixed evaluation split, named one of"),
        ("digits", {"val_split": "train"}, "--val-split 'train'"),
    ],
)
def test_a_split_name_a_dataset_does_not_have_is_an_error(
    tmp_path: Path, dataset: str, split: dict, message: str
) -> None:
    """timm reads any unknown name as the test split; digits ignored the name."""
    cfg = digits_cfg(dataset=dataset, data_dir=str(tmp_path), dataset_download=False, **split)
    with pytest.raises(DatasetNotFoundError, match=message):
        create_datasets(cfg)


@pytest.mark.parametrize("names", [("training", "val"), ("train", "test")])
def test_timm_split_names_select_the_halves_of_a_fixed_split(names: tuple[str, str]) -> None:
    train, evaluation = create_datasets(digits_cfg(train_split=names[0], val_split=names[1]))
    default_train, default_eval = create_datasets(digits_cfg())
    assert len(train) == len(default_train) and len(evaluation) == len(default_eval)


@pytest.mark.parametrize(("size", "world"), [(7, 2), (10, 3), (2, 3)])
def test_evaluation_ranks_share_the_split_without_repeating_a_sample(size: int, world: int) -> None:
    """timm's ordered sampler pads the ranks with wrapped-around samples, counted twice."""
    from statten.data.loaders import eval_sampler

    dataset = torch.utils.data.TensorDataset(torch.arange(size))
    shares = [
        list(eval_sampler(Namespace(distributed=True, world_size=world, rank=r), dataset))
        for r in range(world)
    ]
    assert sorted(i for share in shares for i in share) == list(range(size))


def test_a_class_missing_in_the_evaluation_split_keeps_the_training_labels(
    tmp_path: Path,
) -> None:
    """timm labelled each split by its own classes: without bee, cat became 1 in val/."""
    write_tree(tmp_path, {"train": {"ant": 1, "bee": 1, "cat": 1}, "val": {"ant": 1, "cat": 1}})
    (tmp_path / "val" / "bee").mkdir()  # empty folder
    with pytest.warns(UserWarning, match=r"no images of 1 of the 3 classes .*'bee'"):
        train, evaluation = create_datasets(folder_cfg(tmp_path))
    assert labels(train) == {"ant": 0, "bee": 1, "cat": 2}
    assert labels(evaluation) == {"ant": 0, "cat": 2}


def test_statten_test_labels_the_evaluation_split_by_the_training_classes(
    tmp_path: Path,
) -> None:
    """``statten test`` builds the evaluation split alone; train/ still names the classes."""
    write_tree(tmp_path, {"train": {"ant": 1, "bee": 1, "cat": 1}, "val": {"bee": 1, "cat": 1}})
    with pytest.warns(UserWarning, match="'ant'"):
        evaluation = build_dataset(folder_cfg(tmp_path), False)
    assert labels(evaluation) == {"bee": 1, "cat": 2}
    alone = write_tree(tmp_path / "alone", {"val": {"bee": 1, "cat": 1}})
    assert labels(build_dataset(folder_cfg(alone), False)) == {"bee": 0, "cat": 1}


def test_a_class_absent_from_the_training_split_is_an_error_naming_it(tmp_path: Path) -> None:
    write_tree(tmp_path, {"train": {"ant": 1, "cat": 1}, "val": {"ant": 1, "bee": 1, "cat": 1}})
    (tmp_path / "train" / "bee").mkdir()  # empty in train only
    with pytest.raises(DatasetNotFoundError, match=r"classes that the training split .* 'bee'"):
        create_datasets(folder_cfg(tmp_path))


@pytest.mark.parametrize(
    ("dataset", "configured", "found"),
    [("", 1000, 2), ("digits", 100, 10), ("torch/cifar10", 100, 10), ("cifar10-dvs", 11, 10)],
)
def test_num_classes_other_than_the_data_has_is_an_error_naming_both(
    image_tree: Path, dataset: str, configured: int, found: int
) -> None:
    """The CLI's default of 1000 classes was used silently for a 2-class folder."""
    cfg = folder_cfg(image_tree, dataset=dataset, num_classes=configured)
    with pytest.raises(ConfigError, match=f"num_classes is {configured} but .* has {found} "):
        create_datasets(cfg)


def write_corrupt_images(root: Path) -> tuple[Path, Path]:
    """Add to ``root/train/cat`` a file that is no image and a truncated JPEG."""
    not_an_image = root / "train" / "cat" / "1_garbage.png"
    not_an_image.write_bytes(b"not an image at all")
    truncated = root / "train" / "cat" / "2_truncated.jpg"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    return not_an_image, truncated


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_one_line_naming_the_file(tmp_path: Path, workers: int) -> None:
    """timm skipped it silently (a log line) and trained on the next image twice."""
    write_tree(tmp_path, {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "dog": 1}})
    not_an_image, truncated = write_corrupt_images(tmp_path)
    dataset = build_dataset(folder_cfg(tmp_path, no_aug=True), True)
    for index, path in ((1, not_an_image), (2, truncated)):
        loader = torch.utils.data.DataLoader(dataset, sampler=[index], num_workers=workers)
        with pytest.raises(CorruptSampleError, match="--skip-corrupt") as info:
            next(iter(loader))
        message = str(info.value)
        assert message.startswith(f"unreadable image {str(path)!r}") and "\n" not in message
        assert isinstance(info.value, DatasetNotFoundError)  # the CLI's one-line user error


def test_skip_corrupt_replaces_the_image_with_a_warning_and_a_count(tmp_path: Path) -> None:
    write_tree(tmp_path, {"train": {"cat": 1, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    not_an_image, truncated = write_corrupt_images(tmp_path)
    assert parse_config(["--skip-corrupt"], "train").skip_corrupt
    cfg = folder_cfg(tmp_path, batch_size=5, skip_corrupt=True, no_aug=True, hflip=0.0, workers=0)
    loader = create_loaders(cfg)[0]
    with pytest.warns(UserWarning) as caught:
        images, _ = next(iter(loader))
    assert images.shape == (5, 3, 8, 8)  # the batch keeps its size
    messages = [str(w.message) for w in caught if "--skip-corrupt" in str(w.message)]
    assert str(not_an_image) in messages[0] and "(1 unreadable file(s)" in messages[0]
    assert str(truncated) in messages[1] and "(2 unreadable file(s)" in messages[1]
    replaced = loader.dataset[1][0]  # 1_garbage.png -> 2_truncated.jpg -> dog/0.png
    assert torch.equal(replaced, loader.dataset[3][0])


def test_empty_evaluation_split_is_an_error(image_tree: Path, monkeypatch) -> None:
    """A split that exists but holds no sample gave NaN metrics over 0 samples."""
    from statten.data import datasets

    def build(cfg: Namespace, data_cfg: dict, training: bool) -> torch.utils.data.Dataset:
        return torch.utils.data.TensorDataset(torch.zeros(4 if training else 0, 1))

    monkeypatch.setitem(datasets.DATASETS, "tiny", DatasetSpec(build, num_classes=2))
    with pytest.raises(DatasetNotFoundError, match="evaluation split of dataset 'tiny' is empty"):
        create_datasets(Namespace(dataset="tiny", data_dir="somewhere"))


def test_a_training_split_smaller_than_a_batch_is_an_error(tmp_path: Path) -> None:
    """drop_last made every epoch train on nothing."""
    write_tree(tmp_path, {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "dog": 1}})
    with pytest.raises(DatasetNotFoundError, match="2 samples, fewer than --batch-size 4"):
        create_loaders(folder_cfg(tmp_path, batch_size=4))


def test_a_partial_config_takes_the_parsers_defaults() -> None:
    """One source of defaults: what the data package assumes for a missing attribute is what
    `statten train` would use, except the settings that are not flags or left to the dataset."""
    from statten.config import build_parser
    from statten.data.options import NOT_FLAGS, option

    for action in build_parser("train")._actions:
        if action.dest not in {"help", *NOT_FLAGS}:
            assert option(Namespace(), action.dest) == action.default, action.dest


def test_channels_that_do_not_match_the_normalisation_are_an_error(image_tree: Path) -> None:
    """The digits recipe's in_channels 1 with an RGB folder used to crash inside the transform."""
    cfg = Namespace(dataset="", data_dir=str(image_tree), img_size=32, in_channels=1)
    with pytest.raises(ConfigError, match="in_channels is 1 but the normalisation has 3"):
        create_datasets(cfg)
    create_datasets(Namespace(**vars(cfg), mean=[0.5], std=[0.25]))
