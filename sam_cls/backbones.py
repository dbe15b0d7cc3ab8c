"""Networks a practitioner brings: any torchvision classification model by name, or their own nn.Module.

Either becomes the body of an Encoder (model.py), so the trainer sees what it sees of the built-in encoders: a
network from normalised pixels to `dim` features. A torchvision model is built by torchvision's own
`get_model(name, num_classes=dim)`: its classifier *is* the projection to the embedding, and every other name
and shape stays torchvision's, so a state dict of the same model loads as it is (--init-weights). A user module's
output, flattened, is its features, and a linear projection to `dim` follows it (always: the same shape of
network as a torchvision model's, and the one layer --freeze-backbone trains).

A run stores weights only; the recipe (recipe()) records how to build the network again: a torchvision name is
rebuilt from it, a user module must be handed back (`sam_cls.load(run, encoder=MyNet())`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from sam_cls.files import NotRegularFileError, open_file

USER_MODULE = "module"  # the config's encoder name for a user nn.Module (given from Python only)
SMALL_INPUT = 32  # images this size or smaller get the small-image stem, as CIFAR networks have
# Patch-embedding transformers fix their input size by position embeddings: a stride-1 stem would break them.
_PATCH_MODELS = ("vit_", "swin_", "maxvit_")
# Models whose auxiliary classifiers would make training return tuples; their own flags turn them off.
_BUILD_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
                  "inception_v3": {"aux_logits": False, "init_weights": True}}


class BackboneError(ValueError):
    """A network that cannot be built, given or loaded as asked; the message names the value and the fix."""


def torchvision_names() -> list[str]:
    """torchvision's classification models (not its detection, segmentation or video ones)."""
    return torchvision.models.list_models(module=torchvision.models)


class Backbone(nn.Module):
    """A network whose output is the embedding's features: a torchvision model whose classifier has `dim`
    outputs, or a user module followed by `projection`."""

    def __init__(self, net: nn.Module, expand_to: int | None = None, projection: nn.Module | None = None):
        super().__init__()
        self.net = net
        # A grey image is repeated over the channels the network takes rather than its first convolution cut to
        # one channel: the network keeps torchvision's shapes, so RGB weights (--init-weights) still load.
        self.expand_to = expand_to
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand_to and x.shape[1] == 1:
            x = x.expand(-1, self.expand_to, -1, -1)
        y = self.net(x)
        if not isinstance(y, torch.Tensor):
            raise BackboneError(f"the encoder's network returned a {type(y).__name__}, not a tensor of features: "
                                "give a module whose forward returns one tensor (B, ...)")
        return y if self.projection is None else self.projection(y.flatten(1))


def last_layer(body: nn.Module) -> tuple[str, nn.Module]:
    """The body's last layer with weights, by registration order: the projection to the embedding (a
    torchvision model's classifier, a user module's added projection, the built-in encoders' Linear)."""
    layers = [(name, m) for name, m in body.named_modules()
              if not list(m.children()) and list(m.parameters(recurse=False))]
    if not layers:
        raise BackboneError("the encoder has no layer with weights to project to the embedding")
    return layers[-1]


def small_stem(net: nn.Module) -> None:
    """The usual small-image stem: the first convolution at stride 1 and a max pool right after it removed (a
    CIFAR ResNet's conv1 and maxpool), so a 32 x 32 image is not cut to 8 x 8 before the first block. Kernel
    sizes stay, so the weights of the same torchvision model still fit."""
    modules = list(net.named_modules())
    convs = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not convs:
        return
    modules[convs[0]][1].stride = (1, 1)
    stop = convs[1] if len(convs) > 1 else len(modules)
    for name, m in modules[convs[0] + 1 : stop]:
        if isinstance(m, nn.MaxPool2d):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, nn.Identity())
            return


@torch.no_grad()
def probe(body: Backbone, image_shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """The body's output for a batch of blank images: its feature size, and a clear error where it cannot take
    images of this shape (too small for its pooling, a fixed input size)."""
    was_training = body.training
    body.eval()  # BatchNorm statistics untouched, dropout off
    try:
        out = body(torch.zeros(2, *image_shape))
    except BackboneError:
        raise
    except (RuntimeError, ValueError, AssertionError, TypeError) as e:
        c, h, w = image_shape
        raise BackboneError(f"the {what} encoder cannot take {c}x{h}x{w} images ({str(e).splitlines()[0]}): use "
                            "larger images or another --encoder") from None
    finally:
        body.train(was_training)
    if out.ndim < 2:
        raise BackboneError(f"the {what} encoder gives features of shape {tuple(out.shape)} for a batch of 2: "
                            "its forward must return (B, ...)")
    return out


def torchvision_body(name: str, image_shape: tuple[int, int, int], dim: int) -> Backbone:
    """torchvision's `name` with `dim` outputs (its classifier is the projection), the small-image stem for
    images of 32 x 32 or smaller, grey images repeated to its input channels."""
    c, h, w = image_shape
    net = torchvision.models.get_model(name, weights=None, num_classes=dim, **_BUILD_OPTIONS.get(name, {}))
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    if c not in (1, first.in_channels):
        raise BackboneError(f"the {name} encoder takes {first.in_channels}-channel images (or grey ones), got {c} "
                            "channels: convert the images to RGB")
    if max(h, w) <= SMALL_INPUT and not name.startswith(_PATCH_MODELS):
        small_stem(net)
    body = Backbone(net, expand_to=first.in_channels if c != first.in_channels else None)
    probe(body, image_shape, name)
    return body


def module_body(net: nn.Module, image_shape: tuple[int, int, int], dim: int) -> Backbone:
    """A user module, its flattened output projected to `dim` by a new Linear layer."""
    features = probe(Backbone(net), image_shape, type(net).__name__).flatten(1).shape[1]
    return Backbone(net, projection=nn.Linear(features, dim))


def recipe(name: str, image_shape: tuple[int, int, int], module: nn.Module | None = None) -> dict:
    """How to build the network again, for the run to record: built here from names and sizes, or a user module
    that must be handed back (its class named, never pickled)."""
    c, h, w = image_shape
    if name == USER_MODULE:
        cls = type(module) if module is not None else None
        return {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}" if cls else "unknown",
                "projection": "linear to dim"}
    if name not in torchvision_names():
        return {"kind": "builtin", "name": name}
    return {"kind": "torchvision", "name": name, "torchvision": torchvision.__version__, "num_classes": "dim",
            "small_stem": max(h, w) <= SMALL_INPUT and not name.startswith(_PATCH_MODELS),
            "grey_repeated": c == 1}


def check_module(name: str, module: nn.Module | None, network: dict | None, run: str) -> None:
    """A run of a user module needs one handed back; any other run must not be given one."""
    if name == USER_MODULE and module is None:
        cls = (network or {}).get("class", "your module's class")
        raise BackboneError(f"{run} was trained with a user nn.Module ({cls}): a run keeps its weights, not its "
                            f"code; load it with sam_cls.load({run!r}, encoder={cls.rsplit('.', 1)[-1]}())")
    if name != USER_MODULE and module is not None:
        raise BackboneError(f"{run} was trained with the {name} encoder, which it builds itself: load it without "
                            "encoder=")


# -------------------------------------------------------------------------------------------- --init-weights

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, never running code from it: torch.load(weights_only=True), or safetensors."""
    path = Path(path).expanduser()
    fix = "save one with torch.save(model.state_dict(), FILE)"
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load as load_safetensors
            except ImportError:
                raise BackboneError(f"--init-weights {path} is a safetensors file and the safetensors package is "
                                    f"not installed: pip install safetensors, or {fix}") from None
            with open_file(path, follow=True) as f:
                state = load_safetensors(f.read())
        else:
            with open_file(path, follow=True) as f:  # a FIFO named weights.pt would block the read
                state = torch.load(f, map_location="cpu", weights_only=True)
    except BackboneError:
        raise
    except (FileNotFoundError, NotRegularFileError) as e:
        raise BackboneError(f"--init-weights {path}: {e.strerror or 'not found'}; pass a state dict file") from None
    except pickle.UnpicklingError:  # weights_only met something other than tensors and plain containers
        raise BackboneError(f"--init-weights {path} holds Python objects besides tensors, refused unread (loading "
                            f"them could run code): {fix}") from None
    except Exception as e:  # noqa: BLE001 -- torch raises many types for foreign or damaged files; one line each
        raise BackboneError(f"cannot read --init-weights {path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); {fix}") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise BackboneError(f"--init-weights {path} holds no state dict of tensors (found {keys}): {fix}")
    return state


def _listed(what: str, items: list[str], shown: int = 6) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{what} ({len(items)}): {', '.join(items[:shown])}{more}"


def load_init_weights(body: nn.Module, path: str | Path, name: str, log: Callable[[str], None]) -> None:
    """Load a state dict into the network, or fail with one error listing every name that does not fit.

    The file's classifier (a torchvision model's, for its own classes) is left out where its shape is not the
    projection's: the projection replaces it. Every other weight and buffer must fit by name and shape.
    """
    state = read_state_dict(path)
    net = body.net if isinstance(body, Backbone) else body
    own = net.state_dict()
    projection = last_layer(net)[0] + "." if not (isinstance(body, Backbone) and body.projection) else None
    replaced = [k for k in state if projection and k.startswith(projection)
                and (k not in own or own[k].shape != state[k].shape)]
    missing = [k for k in own if k not in state and not (projection and k.startswith(projection))]
    unexpected = [k for k in state if k not in own and k not in replaced]
    mismatched = [f"{k} (file {tuple(v.shape)}, network {tuple(own[k].shape)})" for k, v in state.items()
                  if k in own and k not in replaced and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [_listed(w, items) for w, items in (("missing", missing), ("unexpected", unexpected),
                                                     ("mismatched", mismatched)) if items]
        prefix = os.path.commonprefix(list(state)).rpartition(".")[0]
        hint = (f"the file's names all start with {prefix + '.'!r} (a wrapper's): save the inner model's "
                "state_dict()" if prefix and prefix + "." not in {k[: len(prefix) + 1] for k in own} else
                f"save the state_dict() of the same network, named as torchvision.models.get_model({name!r})'s "
                "(the small-image stem changes strides only, never shapes)")
        raise BackboneError(f"--init-weights {path} does not fit the {name} encoder: {'; '.join(parts)}; {hint}")
    net.load_state_dict({k: v for k, v in state.items() if k not in replaced}, strict=False)
    if replaced:
        log(f"--init-weights: left out the file's classifier ({', '.join(replaced)}): the projection to the "
            "embedding replaces it")
