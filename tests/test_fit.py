"""sam_cls.fit: training from Python on arrays, tensors and torch Datasets, with a torchvision model or your own
nn.Module, and loading a run of your own module back."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.transforms.v2 import functional as TF

import sam_cls
from sam_cls.backbones import BackboneError
from sam_cls.checkpoint import load_tensors
from sam_cls.cli import main
from sam_cls.config import ConfigError
from sam_cls.data import load_dataset

FAST = {"dim": 16, "topk": 8, "batch_size": 32, "device": "cpu"}


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def digits():
    """Real digits of 4 classes: 24 train and 10 test images of each, uint8 (N, 1, 28, 28), int64 labels."""
    data = load_dataset("mnist-mini")

    def pick(x, y, n):
        idx = torch.cat([(y == c).nonzero()[:n, 0] for c in range(4)])
        return x[idx], y[idx]

    return pick(data.train_x, data.train_y, 24), pick(data.test_x, data.test_y, 10)


class SmallNet(nn.Module):
    """A user network: its output (B, 8, 2, 2) is flattened to 32 features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x)))


class Items(torch.utils.data.Dataset):
    """(image, label) items as torchvision data sets give them: float C x H x W in [0, 1] (ToTensor's)."""

    def __init__(self, x, y):
        self.x, self.y, self.classes = x, y, ["zero", "one", "two", "three"]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].float() / 255, int(self.y[i])


def test_a_torchvision_model_trains_from_numpy_arrays_deterministically(tmp_path, digits):
    (x, y), (tx, ty) = digits
    # 32 x 32 colour images, channels last, as numpy and PIL hold them.
    rgb = TF.pad(x, [2]).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    test = (TF.pad(tx, [2]).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy(), ty.numpy())
    clf = sam_cls.fit("shufflenet_v2_x0_5", (rgb, y.numpy()), test, epochs=1, out=tmp_path / "a", log=quiet, **FAST)
    assert isinstance(clf, sam_cls.MemoryClassifier) and clf.image_shape == (3, 32, 32)
    assert clf.classes == ["0", "1", "2", "3"] and clf.memory.size == 96
    assert clf.state["history"][-1]["test_acc"] > 30  # chance is 25%
    assert clf.state["network"]["name"] == "shufflenet_v2_x0_5" and clf.state["config"]["dataset"] == "python"
    again = sam_cls.fit("shufflenet_v2_x0_5", (rgb, y.numpy()), test, epochs=1, out=tmp_path / "b", log=quiet, **FAST)
    assert torch.equal(clf.memory.embeddings, again.memory.embeddings)  # same seed, same run


def test_a_user_module_trains_is_saved_by_weights_and_needs_handing_back(tmp_path, digits):
    (x, y), (tx, ty) = digits
    out = tmp_path / "run"
    net = SmallNet()
    clf = sam_cls.fit(net, Items(x, y), Items(tx, ty), epochs=2, out=out, log=quiet, **FAST)
    assert clf.classes == ["zero", "one", "two", "three"]  # the Dataset's own class names
    assert clf.state["history"][-1]["test_acc"] > 40
    assert torch.equal(clf.encoder.body.net.conv.weight, net.conv.weight)  # trained in place
    state = load_tensors(out / "checkpoint.pt")
    assert state["network"] == {"kind": "module", "class": f"{__name__}.SmallNet", "projection": "linear to dim"}
    assert state["config"]["encoder"] == "module"

    with pytest.raises(BackboneError, match=r"user nn.Module \(.*SmallNet\).*encoder=SmallNet\(\)"):
        sam_cls.load(out)
    result = CliRunner().invoke(main, ["evaluate", "--run", str(out)])
    assert result.exit_code == 2 and "encoder=SmallNet()" in result.stderr.strip().splitlines()[-1]

    fresh = SmallNet()
    loaded = sam_cls.load(out, encoder=fresh)
    assert torch.equal(fresh.conv.weight, net.conv.weight)  # the run's weights, reattached to the module given
    assert np.array_equal(loaded.predict(tx), clf.predict(tx))
    sam_cls.fit("linear", (x, y), (tx, ty), epochs=1, out=tmp_path / "linear", log=quiet, **FAST)
    with pytest.raises(BackboneError, match="builds itself: load it without encoder="):
        sam_cls.load(tmp_path / "linear", encoder=SmallNet())  # a run of a named encoder refuses a module


def test_frozen_user_module_with_no_training_is_a_memory_of_its_features(tmp_path, digits):
    (x, y), _ = digits
    net = SmallNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    clf = sam_cls.fit(net, (x[:, 0].numpy(), [str(v) for v in y.tolist()]), epochs=0, freeze_backbone=True,
                      out=tmp_path / "run", log=quiet, **FAST)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert clf.memory.size == 88 and clf.state["config"]["validation"] == 0.1  # 10% of train held out to measure
    assert clf.classes == ["0", "1", "2", "3"] and clf.state["history"] == [clf.state["history"][0]]
    assert clf.predict(x[:4]).shape == (4,)


def test_bad_arguments_are_one_clear_error(tmp_path, digits):
    (x, y), _ = digits
    with pytest.raises(ConfigError, match="unknown option.*batchsize"):
        sam_cls.fit("linear", (x, y), batchsize=3, out=tmp_path / "a", log=quiet)
    with pytest.raises(ConfigError, match="resnet18.*'resnet19'"):
        sam_cls.fit("resnet19", (x, y), out=tmp_path / "b", log=quiet)
    with pytest.raises(ConfigError, match="fit sets dataset"):
        sam_cls.fit("linear", (x, y), dataset="mnist", out=tmp_path / "c", log=quiet)
    with pytest.raises(ConfigError, match=r"float images must hold values in \[0, 1\]"):
        sam_cls.fit("linear", (x.float(), y), out=tmp_path / "d", log=quiet)
    with pytest.raises(ConfigError, match="96 images but 3 labels"):
        sam_cls.fit("linear", (x, y[:3]), out=tmp_path / "e", log=quiet)
    assert not any((tmp_path / name).exists() for name in "abcde")
