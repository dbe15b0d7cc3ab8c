"""Your own network from the command line: torchvision models by name, --init-weights, --freeze-backbone,
--epochs 0; real torchvision models trained for a few steps on tiny data."""

import json
import pickle

import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn

from sam_cls.backbones import torchvision_body
from sam_cls.checkpoint import load_tensors
from sam_cls.cli import main
from sam_cls.data import load_dataset

NET = "shufflenet_v2_x0_5"  # the fastest torchvision model on a CPU at 32 x 32 (about 5 ms an image, both ways)
SETTINGS = ["--dim", "16", "--topk", "8", "--batch-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """An image folder of real 28 x 28 grey digits, 4 classes: 24 train and 10 test images of each."""
    root = tmp_path_factory.mktemp("digits")
    data = load_dataset("mnist-mini")
    for split, x, y, n in (("train", data.train_x, data.train_y, 24), ("test", data.test_x, data.test_y, 10)):
        for c in range(4):
            (root / split / str(c)).mkdir(parents=True)
            for i in (y == c).nonzero()[:n, 0].tolist():
                Image.fromarray(x[i, 0].numpy()).save(root / split / str(c) / f"{i}.png")
    return ["--dataset", "imagefolder", "--data-dir", root, *SETTINGS]


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    return errors[0]


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def network_weights(state: dict) -> dict:
    """The checkpoint's torchvision network, by torchvision's own names."""
    return {k.removeprefix("body.net."): v for k, v in state["encoder"].items() if k.startswith("body.net.")}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A state dict of the torchvision model, as a user saves one: its classifier for 5 classes of its own."""
    torch.manual_seed(7)
    net = torchvision.models.get_model(NET, num_classes=5)
    for m in net.modules():  # statistics of its own, as a trained network has, so a test can tell they were kept
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        digits = load_dataset("mnist-mini").train_x[:256].float().div(255).expand(-1, 3, -1, -1)
        net.train()(digits[::2] - 0.1)
    path = tmp_path_factory.mktemp("weights") / "net.pt"
    torch.save(net.state_dict(), path)
    return path


def test_a_torchvision_model_trains_through_the_cli_and_is_recorded_by_name(tmp_path, digits):
    out = tmp_path / "run"
    summary = last_json(run("train", *digits, "--encoder", NET, "--epochs", "1", "--out", out, "--json"))
    assert summary["epochs"] == 1 and summary["test_acc"] > 30  # chance is 25%: above it after 3 steps
    state = load_tensors(out / "checkpoint.pt")
    assert state["config"]["encoder"] == NET
    assert state["network"]["kind"] == "torchvision" and state["network"]["name"] == NET
    assert state["network"]["small_stem"] is True
    evaluated = last_json(run("evaluate", "--run", out, "--json"))  # rebuilt from its name, weights only
    assert evaluated["n"] == 40 and evaluated["accuracy"] == pytest.approx(summary["test_acc"], abs=1e-6)


def test_small_images_get_a_stride_one_stem_and_grey_ones_the_rgb_network():
    body = torchvision_body("resnet18", (1, 28, 28), 16)
    net = body.net
    assert net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    assert net.conv1.weight.shape == (64, 3, 7, 7)  # torchvision's shapes: its state dicts load as they are
    assert net.fc.out_features == 16  # the classifier is the projection to the embedding
    assert body(torch.zeros(2, 1, 28, 28)).shape == (2, 16)  # grey images repeated over R, G and B
    large = torchvision_body("resnet18", (3, 64, 64), 16).net
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, nn.MaxPool2d)


def test_a_network_that_cannot_take_the_images_and_an_unknown_name_are_one_line(tmp_path, digits):
    line = error_line(run("train", *digits, "--encoder", "vit_b_16", "--out", tmp_path / "a", ok=False))
    assert "vit_b_16" in line and "1x28x28" in line and "--encoder" in line
    line = error_line(run("train", *digits, "--encoder", "resnet19", "--out", tmp_path / "b", ok=False))
    assert "'resnet19'" in line and "resnet18" in line and "mobilenet_v3_small" in line and "cnn" in line


def test_frozen_given_weights_and_no_training_make_a_usable_memory(tmp_path, digits, weights_file):
    out = tmp_path / "run"
    result = run("train", *digits, "--encoder", NET, "--init-weights", weights_file, "--freeze-backbone",
                 "--epochs", "0", "--out", out, "--json")
    summary = last_json(result)
    assert summary["epochs"] == 0 and summary["test_acc"] is not None
    assert "left out the file's classifier (fc.weight, fc.bias)" in result.stderr
    state = load_tensors(out / "checkpoint.pt")
    given, kept = torch.load(weights_file, weights_only=True), network_weights(state)
    assert all(torch.equal(kept[k], v) for k, v in given.items() if not k.startswith("fc."))  # BN statistics too
    assert kept["fc.weight"].shape == (16, 1024) and state["step"] == 0
    evaluated = last_json(run("evaluate", "--run", out, "--json"))
    assert evaluated["accuracy"] == pytest.approx(summary["test_acc"], abs=1e-6)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0]


def test_freeze_backbone_trains_the_projection_only(tmp_path, digits, weights_file):
    out = tmp_path / "run"
    run("train", *digits, "--encoder", NET, "--init-weights", weights_file, "--freeze-backbone", "--epochs", "1",
        "--out", out)
    kept = network_weights(load_tensors(out / "checkpoint.pt"))
    given = torch.load(weights_file, weights_only=True)
    backbone = [k for k in given if not k.startswith("fc.")]
    assert all(torch.equal(kept[k], given[k]) for k in backbone)  # weights and BatchNorm statistics
    fresh = torchvision_body(NET, (3, 32, 32), 16).net.fc.weight
    assert not torch.equal(kept["fc.weight"], fresh)  # the projection did train (and was not reset)
    thawed = error_line(run("train", "--no-freeze-backbone", "--epochs", "2", "--resume", "--out", out, ok=False))
    assert "freeze_backbone=True" in thawed  # a frozen run resumes frozen (its own config), or not at all
    run("train", *digits, "--encoder", NET, "--init-weights", weights_file, "--epochs", "1", "--out", tmp_path / "all")
    unfrozen = network_weights(load_tensors(tmp_path / "all" / "checkpoint.pt"))
    assert not torch.equal(unfrozen["conv1.0.weight"], given["conv1.0.weight"])  # without it the backbone moves


def test_weights_that_do_not_fit_are_one_error_listing_them(tmp_path, digits, weights_file):
    state = torch.load(weights_file, weights_only=True)
    state["conv1.0.weight"] = torch.zeros(24, 3, 5, 5)  # mismatched
    state["stage9.weight"] = state.pop("conv5.0.weight")  # one unexpected, one missing
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    line = error_line(run("train", *digits, "--encoder", NET, "--init-weights", bad, "--out", tmp_path / "run", ok=False))
    assert f"--init-weights {bad} does not fit the {NET} encoder" in line
    assert "missing (1): conv5.0.weight" in line and "unexpected (1): stage9.weight" in line
    assert "mismatched (1): conv1.0.weight (file (24, 3, 5, 5), network (24, 3, 3, 3))" in line
    assert "state_dict()" in line  # the fix
    wrapped = tmp_path / "wrapped.pt"
    torch.save({f"module.{k}": v for k, v in torch.load(weights_file, weights_only=True).items()}, wrapped)
    line = error_line(run("train", *digits, "--encoder", NET, "--init-weights", wrapped, "--out", tmp_path / "w", ok=False))
    assert "'module.'" in line


class Planted:
    """An object whose unpickling would run code: a weights file must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_weights_file_holding_code_is_refused_without_running_it(tmp_path, digits):
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"conv1.0.weight": Planted(marker)}))
    line = error_line(run("train", *digits, "--encoder", NET, "--init-weights", path, "--out", tmp_path / "run", ok=False))
    assert str(path) in line and "state_dict" in line
    assert not marker.exists()
