"""Encoders: map uint8 images to L2-normalised embeddings; the memory does the classifying."""

import torch
import torch.nn.functional as F
from torch import nn

from sam_cls.backbones import (
    USER_MODULE,
    last_layer,
    module_body,
    recipe,
    torchvision_body,
    torchvision_names,
)

ENCODERS = ("linear", "conv1", "cnn")  # built here; --encoder also takes any torchvision classification model


class Encoder(nn.Module):
    """Normalise pixels, run a body, project to `dim`, L2-normalise (so a dot product is a cosine)."""

    def __init__(self, body: nn.Module, mean: torch.Tensor, std: torch.Tensor, head: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.head = head  # only for the parametric baseline: a linear softmax classifier on the features
        # Buffers, so the pixel statistics travel with the weights in every checkpoint.
        self.register_buffer("mean", mean.float().view(1, -1, 1, 1).clone())
        self.register_buffer("std", std.float().clamp_min(1e-3).view(1, -1, 1, 1).clone())
        # Convolutions run 1.2-1.6x faster on CPU in NHWC (oneDNN's native layout; conv1 73 -> 45 ms a
        # CIFAR batch of 128); a purely linear body gains nothing and would pay a copy.
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in body.modules())
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.frozen = False  # --freeze-backbone: only the projection (and a softmax head) trains
        self.recipe: dict = {}  # how to build this network again (backbones.recipe), recorded in each checkpoint

    def freeze_backbone(self) -> None:
        """Train the projection to the embedding only (the body's last layer; a softmax head too)."""
        self.frozen = True
        projection = last_layer(self.body)[1]
        for p in self.body.parameters():
            p.requires_grad_(False)
        for p in projection.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its BatchNorm statistics and runs without dropout
            self.body.eval()
            last_layer(self.body)[1].train(mode)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised output of the body (the softmax baseline puts its head on this)."""
        x = (x.float() / 255.0 - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


# The smallest image side each encoder's pooling leaves at least one pixel of.
MIN_SIDE = {"linear": 1, "conv1": 2, "cnn": 8}


def build_body(name: str, image_shape: tuple[int, int, int], dim: int, module: nn.Module | None = None) -> nn.Module:
    """The three encoder bodies (the seed's Linear and 1Conv, and a small CNN that trains on a CPU), a torchvision
    model, or a user module (backbones.py)."""
    c, h, w = image_shape
    if name == USER_MODULE:
        if module is None:
            raise ValueError("--encoder module is a user nn.Module, which only Python can give: "
                             "sam_cls.fit(MyNet(), ...)")
        return module_body(module, image_shape, dim)
    if name not in ENCODERS and name in torchvision_names():
        return torchvision_body(name, image_shape, dim)
    if name in MIN_SIDE and min(h, w) < MIN_SIDE[name]:
        raise ValueError(f"the {name} encoder needs images of at least {MIN_SIDE[name]}x{MIN_SIDE[name]} pixels, got "
                         f"{h}x{w}: use larger images or --encoder linear")
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, dim))
    if name == "conv1":
        # The seed's "1Conv": Conv -> MaxPool -> ReLU -> Linear. 64 filters of 5x5 keep it one layer
        # deep while giving the linear map enough features to learn a metric from.
        return nn.Sequential(
            nn.Conv2d(c, 64, 5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * (h // 2) * (w // 2), dim),
        )
    if name == "cnn":
        # airbench-shaped: a thin full-resolution stem, then three stages that pool first and convolve
        # twice (64, 128, 256 wide), global max pool. Pooling before the wide convolutions keeps it near
        # 35 MMACs an image (about 800 CIFAR images/s forward+backward on 2 cores).
        return nn.Sequential(
            conv_bn(c, 32), nn.MaxPool2d(2),
            conv_bn(32, 64), conv_bn(64, 64), nn.MaxPool2d(2),
            conv_bn(64, 128), conv_bn(128, 128), nn.MaxPool2d(2),
            conv_bn(128, 256), conv_bn(256, 256),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(256, dim),
        )
    raise ValueError(f"unknown encoder {name!r}: choose one of {', '.join(encoder_names())} (--encoder)")


def encoder_names() -> list[str]:
    """What --encoder accepts by name: the built-in encoders, then torchvision's classification models."""
    return [*ENCODERS, *torchvision_names()]


def build_encoder(
    name: str,
    image_shape: tuple[int, int, int],
    dim: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    num_classes: int | None = None,
    module: nn.Module | None = None,
) -> Encoder:
    """The encoder; with `num_classes`, also a linear head so it can be trained as a plain softmax classifier;
    `module`: the user network of `--encoder module` (sam_cls.fit)."""
    # The head first: weights are drawn in the order runs trained before drew them, so a seed gives the same net.
    head = nn.Linear(dim, num_classes) if num_classes else None
    body = build_body(name, image_shape, dim, module)
    encoder = Encoder(body, mean, std, head)
    encoder.recipe = recipe(name, image_shape, module)
    return encoder


@torch.no_grad()
def calibrate_batchnorm(encoder: Encoder, images: torch.Tensor, batch_size: int, count: int = 4096) -> None:
    """Real-batch statistics in fresh BatchNorm layers, so the eval-mode memory looks like train-mode queries."""
    # With a new network's running statistics (mean 0, variance 1) the first memory would be unlike the
    # queries that read it, and the first epoch would learn against noise (CIFAR-10/cnn validation after
    # one epoch: 40% without this, 62% with it).
    norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    if not norms:
        return
    stride = max(1, len(images) // count)  # spread over the set: some formats store it class by class
    sample = images[::stride]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    encoder.eval()
    for m in norms:  # only the norms in training mode: a frozen backbone's (Encoder.train) are estimated too
        m.train()
    for i in range(0, len(sample), batch_size):
        encoder(sample[i : i + batch_size])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
