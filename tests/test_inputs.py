"""What a trained run takes and gives from Python: arrays and tensors in every common layout and value range,
images decoded as a viewer shows them, numpy results, and bounds checked as the CLI checks them."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import ToTensor

import sam_cls
from sam_cls.data import DatasetError, load_dataset
from sam_cls.images import decode


@pytest.fixture(scope="module")
def clf(mini_linear_run):
    return sam_cls.load(mini_linear_run, device="cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("mnist-mini").test_x[:20]  # uint8 (20, 1, 28, 28)


def png(image: Image.Image, **params) -> Image.Image:
    """The image written to a real file's bytes and read back, as a user's file would be."""
    buffer = io.BytesIO()
    image.save(buffer, format=params.pop("format", "PNG"), **params)
    buffer.seek(0)
    return Image.open(buffer)


def test_every_layout_and_value_range_reads_as_the_uint8_batch(clf, digits):
    expected = clf.predict(digits)
    grey = digits[:, 0]  # (20, 28, 28)
    pil = Image.fromarray(grey[0].numpy())
    as_given = {
        "NCHW tensor": digits, "NCHW numpy": digits.numpy(), "NHWC numpy": digits.permute(0, 2, 3, 1).numpy(),
        "float 0..1 tensor": digits.float() / 255, "float64 numpy": digits.double().numpy() / 255,
        "uint16 numpy": digits.numpy().astype(np.uint16) * 257,
    }
    for name, x in as_given.items():
        assert np.array_equal(clf.predict(x), expected), name
    one = {
        "HW uint8 tensor": grey[0], "CHW tensor": digits[0], "HWC numpy": digits[0].permute(1, 2, 0).numpy(),
        "np.asarray(PIL)": np.asarray(pil), "ToTensor()": ToTensor()(pil), "RGB HWC numpy":
        np.asarray(pil.convert("RGB")), "RGB CHW tensor": torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1),
    }
    for name, x in one.items():
        assert clf.predict(x).tolist() == expected[:1].tolist(), name
    mix = [grey[0], digits[1].numpy(), Image.fromarray(grey[2].numpy())]  # a list of any forms
    assert clf.predict(mix).tolist() == expected[:3].tolist()


def test_a_refusal_names_the_array_actually_given(clf):
    with pytest.raises(DatasetError, match=r"numpy array uint8 \(5, 28, 28\)"):
        clf.predict(np.zeros((5, 28, 28), np.uint8))  # a batch of grey images needs its channel axis
    with pytest.raises(DatasetError, match=r"tensor float32 \(28, 28\) with values 0..3"):
        clf.predict(torch.linspace(0, 3, 28 * 28).reshape(28, 28))  # 0..255 floats: not ToTensor's range
    with pytest.raises(DatasetError, match="int64"):
        clf.predict(torch.zeros(28, 28, dtype=torch.int64))


def test_results_are_numpy_arrays_or_tensors_when_asked(clf, digits):
    predicted, proba = clf.predict(digits[:4]), clf.predict_proba(digits[:4])
    assert isinstance(predicted, np.ndarray) and predicted.shape == (4,)
    assert isinstance(proba, np.ndarray) and proba.shape == (4, 10)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    assert isinstance(clf.predict_log_proba(digits[:4]), np.ndarray)
    sims, cells = clf.kneighbors(digits[:4], 3)
    assert isinstance(sims, np.ndarray) and isinstance(cells, np.ndarray) and cells.shape == (4, 3)
    assert torch.equal(clf.predict(digits[:4], torch=True), torch.from_numpy(predicted))
    assert all(isinstance(t, torch.Tensor) for t in clf.kneighbors(digits[:4], 3, torch=True))
    assert list(clf.classes_[predicted]) == [clf.classes[i] for i in predicted]
    assert clf.describe(cells[0, 0]) == f"mnist-mini train #{cells[0, 0]}"  # a numpy integer is a cell number


def test_bounds_are_checked_in_the_api(clf, digits):
    for n in (0, -1, clf.memory.size + 1):
        with pytest.raises(ValueError, match=f"n_neighbors .* got {n}"):
            clf.kneighbors(digits[:1], n)
    assert clf.kneighbors(digits[:1])[1].shape == (1, clf.topk)  # None: the run's K
    for cell in (-1, 99999):
        with pytest.raises(ValueError, match=f"cell {cell} is not in the memory: cells are numbered 0 to 4999"):
            clf.describe(cell)
    with pytest.raises(ValueError, match="neighbours"):
        clf.explain(digits[0], 0)


def test_the_run_stores_its_background(clf):
    assert clf.state["data"]["background"] == 0  # MNIST: white digits on black


def test_a_transparent_drawing_reads_as_the_digit_it_shows(clf, digits):
    """A digit exported with its shape in the alpha channel (black or white ink on a clear canvas) is read as
    the plain digit is; PIL's own conversion reads every such drawing as a blank page or an empty square."""
    expected = clf.predict(digits)
    for ink in (0, 255):
        drawings = []
        for d in digits[:, 0].numpy():
            rgba = np.zeros((28, 28, 4), np.uint8)
            rgba[..., :3], rgba[..., 3] = ink, d
            drawings.append(png(Image.fromarray(rgba, "RGBA")))
        decoded = torch.cat([decode(im, clf.background) for im in drawings])
        assert (decoded.int() - digits.int()).abs().max() <= 1, ink  # the digit itself, to rounding
        assert np.array_equal(clf.predict(drawings), expected)
    # Grey + alpha and a palette with a transparent colour go the same way.
    la = png(Image.merge("LA", [Image.new("L", (28, 28), 0), Image.fromarray(digits[0, 0].numpy())]))
    assert (decode(la, 0).int() - digits[:1].int()).abs().max() <= 1


def test_16_bit_float_and_32_bit_images_are_scaled_from_their_range(clf, digits):
    d = digits[0, 0].numpy()
    deep = {
        "16-bit PNG": png(Image.fromarray(d.astype(np.uint16) * 257)),
        "float TIFF 0..1": png(Image.fromarray(d.astype(np.float32) / 255), format="TIFF"),
        "32-bit integers 0..65535": Image.fromarray(d.astype(np.int32) * 257),
    }
    assert deep["16-bit PNG"].mode.startswith("I;16") and deep["float TIFF 0..1"].mode == "F"
    for name, image in deep.items():
        assert (decode(image).int() - digits[:1].int()).abs().max() <= 1, name


def test_exif_orientation_and_palettes_are_applied(digits):
    d = Image.fromarray(digits[0, 0].numpy())
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    stored = png(d.transpose(Image.Transpose.ROTATE_90), format="JPEG", quality=100, exif=exif.tobytes())
    shown = decode(stored)
    assert shown.shape == (1, 1, 28, 28)
    assert (shown.int() - digits[:1].int()).abs().float().mean() < 3  # upright again (JPEG: to its noise)
    palette = png(d.convert("RGB").quantize(16))
    assert palette.mode == "P" and decode(palette).shape == (1, 3, 28, 28)


def test_an_image_far_smaller_than_the_input_is_a_warning(mini_linear_run, tmp_path):
    lines = []
    clf = sam_cls.load(mini_linear_run, device="cpu", log=lines.append)
    Image.new("L", (1, 1), 255).save(tmp_path / "dot.png")
    clf.predict(tmp_path / "dot.png")
    assert any("dot.png is 1x1, far smaller than the run's 28x28 input" in line for line in lines)
    lines.clear()
    clf.predict(np.zeros((20, 20), np.uint8))
    assert not lines  # a little smaller is no warning
