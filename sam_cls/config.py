"""Run configuration: one flat dataclass of hyper-parameters, read from YAML, overridden by the CLI.

Each option is defined once, on its field: default, type, help text, bounds and choices. The `sam-cls train`
flags are generated from the fields (cli.py), and every value, from YAML or the command line, goes through the
same two steps: construction coerces it to its field's type (strictly: `topk: 8.9` is an error, not 8) and
fills derived defaults; validate() checks bounds and choices, and changes nothing.
"""

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from sam_cls.backbones import USER_MODULE, torchvision_names
from sam_cls.data import DATASETS
from sam_cls.index.params import HNSW_M, INDEX_KINDS
from sam_cls.model import ENCODERS, encoder_names

HEADS = ("memory", "softmax")
COPY_KINDS = ("elastic", "crop-flip")  # what a deformed copy is (sam_cls/copies.py)
DEVICES = ("auto", "cpu", "cuda")
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")  # what a boolean option accepts as text


class ConfigError(ValueError):
    """A bad option value; the message names the option and how to fix it."""


class TrainingError(RuntimeError):
    """Training cannot go on under these options (e.g. a NaN loss); the message says what to change."""


def _meta(help: str, *, choices: tuple[str, ...] | None = None, ge=None, gt=None, le=None, lt=None,
         shown: str | None = None, metavar: str | None = None) -> dict:
    """What a Config field's flag needs besides its default and type.

    ge/gt/le/lt: the bounds x >= ge, x > gt, x <= le, x < lt (None: unbounded). choices: the allowed values.
    shown: what --help gives as the default when the default itself says little (None that means "derived").
    """
    return {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "shown": shown,
            "metavar": metavar}


def option(default, help: str, **kwargs):
    """A Config field with an immutable default; see _meta() for the rest."""
    return dataclasses.field(default=default, metadata=_meta(help, **kwargs))


def default_lr(head: str, encoder: str = "conv1") -> float:
    # The encoder's output is L2-normalised, so the gradient reaching its weights shrinks as they grow: a large
    # SGD rate is right here (MNIST/conv1, batch 256, validation after 1 epoch: lr 0.05 93.7%, 0.5 96.7%,
    # 1.5 97.8%, 4 97.2%). The softmax baseline's logits are not normalised and take the usual small rate.
    # A deep torchvision or user network is not the built-in encoders' shallow one: at 1.0 it fell to chance
    # (shufflenet_v2_x0_5 on 96 digits of 4 classes, 1 epoch: 25.0% at lr 1.0, 55.0% at 0.3, 50.0% at 0.1), so it
    # starts from the rate torchvision's own recipes use.
    if head != "memory":
        return 0.01
    return 1.0 if encoder in ENCODERS else 0.1


@dataclass
class Config:
    # data
    dataset: str = option("mnist-mini", "Data set. mnist-mini (5,000 + 1,000 MNIST digits) ships with sam-cls; "
                          "synthetic needs no files; the others read --data-dir.", choices=DATASETS)
    data_dir: str = option("data", "Folder holding the data set: torchvision's layout (MNIST/raw/, "
                           "cifar-10-batches-py/, ...), or DIR/{train,test}/<class>/* for imagefolder.")
    skip_bad_images: bool = option(False, "Skip unreadable images in an image folder (their count is logged) "
                                   "instead of stopping at the first.")
    validation: float = option(0.0, "Hold out this share of train and report accuracy on it instead of test "
                               "(0 = off).", ge=0, lt=1)
    copies: int = option(1, "Memory cells per training image: copy 0 is the image, copies 1.. are seeded "
                         "deformations of it (--copy-kind), made on the fly (a memory C times the training set).",
                         ge=1)
    copy_kind: str = option("elastic", "What a copy (--copies, --deform-queries) is: elastic, an elastic and small "
                            "affine warp (digits); crop-flip, odd copies mirrored and each shifted up to 4 pixels "
                            "(the crop and flip natural images train with).", choices=COPY_KINDS)
    copy_strength: float = option(1.0, "Scales every magnitude of a copy's deformation (elastic: displacement, "
                                  "rotation, scale and shift; crop-flip: the shift). Milder copies are the ones a "
                                  "memory gains from (docs/MEMORY.md).", gt=0)
    synthetic_train: int = option(5000, "Train images of --dataset synthetic.", ge=1)
    synthetic_test: int = option(1000, "Test images of --dataset synthetic.", ge=1)
    synthetic_classes: int = option(10, "Classes of --dataset synthetic.", ge=2)
    synthetic_shape: list[int] = dataclasses.field(default_factory=lambda: [1, 8, 8], metadata=_meta(
        "Image shape of --dataset synthetic, as C,H,W.", metavar="C,H,W"))
    # model and memory
    encoder: str = option("conv1", "linear, conv1 (Conv-MaxPool-ReLU-Linear), cnn (7 conv layers with BatchNorm), "
                          "or any torchvision classification model by name (resnet18, mobilenet_v3_small, ...), its "
                          "classifier the projection to the embedding, with a stride-1 stem for images of 32x32 or "
                          "smaller.", metavar="[linear|conv1|cnn]|MODEL")
    init_weights: str | None = option(None, "State dict file to start the network from (torch.save of "
                                      "model.state_dict(), or .safetensors), read without running code; the "
                                      "file's classifier is left out where the projection replaces it.",
                                      shown="none", metavar="FILE")
    freeze_backbone: bool = option(False, "Train the projection to the embedding only (and a softmax head); the "
                                   "rest of the network, BatchNorm statistics included, stays as built or given.")
    dim: int = option(128, "Embedding dimension.", ge=1)
    topk: int = option(256, "Cells read per query (K); 0 = dense exact read over all cells.", ge=0)
    temperature: float = option(0.05, "Softmax temperature tau of the read.", gt=0)
    eta: float = option(0.5, "Memory write momentum: m <- normalise(eta m + (1 - eta) u).", ge=0, lt=1)
    head: str = option("memory", "memory: the kNN read over the memory; softmax: the same encoder with a linear "
                       "softmax head (the parametric baseline).", choices=HEADS)
    deform_queries: float = option(0.0, "Share of training queries replaced by a fresh seeded deformation of their "
                                   "image (the deformations --copies stores), so the encoder "
                                   "learns the invariance a memory of copies needs.", ge=0, le=1)
    thin_classes: float = option(0.0, "Share of training steps that thin one class's memory to a few cells drawn "
                                 "at random (at most --thin-cells; its other cells hidden from the read), to train "
                                 "for classes added later from a few examples (experimental: docs/MEMORY.md "
                                 "measured no gain).", ge=0, le=1)
    thin_cells: int = option(100, "Most cells a thinned class keeps (each thinned step draws 1 to this many, "
                             "log-uniformly).", ge=1)
    tune_read: bool = option(True, "At the end of training, choose the read (K, temperature, class prior, per-class "
                             "and per-source reads) on the validation share, or on the memory's own cells left one "
                             "out, and store it in the run: predict, evaluate and the API use it.")
    support_sample: int = option(0, "The seed paper's method: M random support images re-encoded every batch, "
                                 "no index (0 = off, else at least 2).", ge=0)
    # optimisation
    epochs: int = option(10, "Passes over the training set; 0 builds the memory from the network as it is (with "
                         "--init-weights, a memory of a given network) and trains nothing.", ge=0)
    # For a fair comparison with a slow method (the seed's support sample) at the time another method took.
    max_seconds: float | None = option(None, "Wall-clock budget for training steps (seconds): training stops at "
                                       "the first step past it, and the learning-rate schedule runs to whichever "
                                       "of epochs and seconds ends first.", gt=0, shown="none")
    batch_size: int = option(128, "Training batch size.", ge=1)
    lr: float | None = option(None, "Peak learning rate (SGD with Nesterov momentum, warm-up then linear "
                              "decay).", gt=0, shown=f"{default_lr('memory')} with --head memory, "
                              f"{default_lr('softmax')} with --head softmax, {default_lr('memory', 'resnet18')} with "
                              "--head memory and another network than linear, conv1, cnn")
    momentum: float = option(0.9, "SGD (Nesterov) momentum.", gt=0, lt=1)
    weight_decay: float = option(5e-4, "SGD weight decay.", ge=0)
    warmup_epochs: float = option(0.5, "Epochs of linear learning-rate warm-up.", ge=0)
    augment: bool = option(True, "Random crop + flip of natural images (digits and synthetic data are never "
                           "augmented).")
    # index
    index: str = option("auto", "ANN back-end over the memory (auto chooses by N, d, K and device).",
                        choices=INDEX_KINDS)
    nlist: int | None = option(None, "IVF lists (k-means cells) of --index ivf or ivfpq.", ge=1,
                               shown="about 4 sqrt(N)")
    nprobe: int | None = option(None, "IVF lists searched per query at evaluation.", ge=1,
                                shown="lists holding ~16 K cells, doubled until a sample of the cells reads recall@K 0.96")
    train_nprobe: int | None = option(None, "IVF lists a training read scans.", ge=1,
                                      shown="lists holding ~4 K cells, at least 8")
    pq_m: int | None = option(None, "PQ sub-quantizers for --index ivfpq.", ge=1, shown="dim / 2")
    hnsw_m: int | None = option(None, "HNSW graph degree.", ge=1, shown=str(HNSW_M))
    ef_search: int | None = option(None, "HNSW search breadth (>= K).", ge=1, shown="2 K, at least 64")
    fp16: bool = option(False, "Float16 storage for a GPU index.")
    rebuild_every: str = option("epoch", "Rebuild the index every N steps, every epoch, or 'auto' (when measured "
                                "staleness passes --staleness-threshold).", metavar="N|epoch|auto")
    staleness_threshold: float = option(0.02, "Mean cosine drift (1 - cos) of the memory from the index that "
                                        "triggers a rebuild under --rebuild-every auto.", ge=0)
    background_rebuild: bool = option(False, "Build the next index in a worker thread while training goes on.")
    # run
    device: str = option("auto", "auto: CUDA when torch sees it, else the CPU.", choices=DEVICES)
    seed: int = option(0, "Random seed (initialisation, batch order, synthetic data, validation split).", ge=0)
    out: str | None = option(None, "Run directory.", shown="runs/<dataset>-<encoder>-k<K>")
    eval_batch_size: int = option(1024, "Batch size for encoding the memory and evaluating.", ge=1)

    def __post_init__(self) -> None:
        """Each value as its field's type (or a one-line ConfigError), rebuild_every normalised, lr filled in."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name)))
        if self.lr is None:
            self.lr = default_lr(self.head, self.encoder)

    def validate(self) -> "Config":
        """Catch bad values before any work, each with the option to change. Checks only: changes nothing."""
        for f in dataclasses.fields(self):
            value, spec = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if spec["choices"] and value not in spec["choices"]:
                raise ConfigError(f"--{flag(f.name)} must be one of {', '.join(spec['choices'])}; got {value!r}")
            if not in_bounds(value, spec):
                raise ConfigError(f"--{flag(f.name)} must be {bounds_text(spec)}, got {value}")
        if self.encoder not in (*encoder_names(), USER_MODULE):
            raise ConfigError(f"--encoder must be one of {', '.join(ENCODERS)} or a torchvision classification "
                              f"model ({', '.join(torchvision_names())}); got {self.encoder!r}")
        if self.epochs == 0 and self.head != "memory":
            raise ConfigError("--epochs 0 builds a memory without training, but --head softmax classifies with a "
                              "trained head: use --head memory, or --epochs 1 or more")
        if self.support_sample == 1:
            raise ConfigError("--support-sample must be 0 (off) or at least 2, got 1")
        if self.copies > 1 and (self.head != "memory" or self.topk == 0 or self.support_sample):
            raise ConfigError(f"--copies {self.copies} needs the sparse memory read (--head memory, --topk > 0, "
                              "no --support-sample): use --copies 1 with this mode")
        if self.thin_classes and (self.head != "memory" or self.topk == 0 or self.support_sample):
            raise ConfigError(f"--thin-classes {self.thin_classes} needs the sparse memory read (--head memory, "
                              "--topk > 0, no --support-sample): use --thin-classes 0 with this mode")
        if len(self.synthetic_shape) != 3 or min(self.synthetic_shape) < 1:
            raise ConfigError(f"--synthetic-shape must be three positive sizes C,H,W, got {self.synthetic_shape}")
        if self.rebuild_every not in ("epoch", "auto") and not (
            self.rebuild_every.isdigit() and int(self.rebuild_every) > 0
        ):
            raise ConfigError(
                f"--rebuild-every must be a positive number of steps, 'epoch' or 'auto', got {self.rebuild_every!r}"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    return name.replace("_", "-")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def _bounds(meta: typing.Mapping) -> tuple:
    """(low, low included, high, high included) of a field; None for an open end."""
    low, low_in = (meta["ge"], True) if meta["ge"] is not None else (meta["gt"], False)
    high, high_in = (meta["le"], True) if meta["le"] is not None else (meta["lt"], False)
    return low, low_in, high, high_in


def in_bounds(value, meta: typing.Mapping) -> bool:
    low, low_in, high, high_in = _bounds(meta)
    return ((low is None or value > low or (low_in and value == low))
            and (high is None or value < high or (high_in and value == high)))


def bounds_text(meta: typing.Mapping, brief: bool = False) -> str:
    """A field's bounds for an error ('>= 0', 'in [0, 1)') or, brief, as click shows a range ('x>=0', '0<=x<1');
    '' when it has none."""
    low, low_in, high, high_in = _bounds(meta)
    if brief:
        left = "" if low is None else f"{low}{'<=' if low_in else '<'}"
        right = "" if high is None else f"{'<=' if high_in else '<'}{high}"
        if low is not None and high is None:  # 'x>=0' reads better than '0<=x'
            return f"x{'>=' if low_in else '>'}{low}"
        return f"{left}x{right}" if left or right else ""
    if low is not None and high is not None:
        return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
    if low is not None:
        return f"{'>=' if low_in else '>'} {low}"
    return "" if high is None else f"{'<=' if high_in else '<'} {high}"


def kind(name: str) -> tuple[type, bool]:
    """A field's value type (int, float, bool, str or list) and whether it may be None."""
    declared = FIELDS[name].type
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        members = [t for t in typing.get_args(declared) if t is not type(None)]
        return members[0], len(members) < len(typing.get_args(declared))
    return typing.get_origin(declared) or declared, False


def _integer(opt: str, value) -> int:
    """An int, or a float or numeric text that is a whole number (8, 8.0, "8", "1e4"); never a bool or 8.9."""
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = None
    if isinstance(number, numbers.Integral) and not isinstance(number, bool):
        return int(number)
    if isinstance(number, numbers.Real) and not isinstance(number, bool) and float(number).is_integer():
        return int(number)
    raise ConfigError(f"{opt} must be a whole number, got {value!r}")


def coerce(name: str, value):
    """A YAML or CLI value as its field's type, so `topk: "5"` works and `topk: five` names the option."""
    opt = f"--{flag(name)}"
    want, optional = kind(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{opt} needs a value, got none (null)")
    if name == "rebuild_every":  # N steps, "epoch" or "auto": stored as text, e.g. "100"
        if isinstance(value, str) and not value.strip().isdigit():
            return value.strip().lower()
        return str(_integer(opt, value))
    if want is bool:
        if isinstance(value, bool):
            return value
        text = value.strip().lower() if isinstance(value, str) else None
        if text in TRUE or text in FALSE:
            return text in TRUE
        raise ConfigError(f"{opt} must be true or false (or yes/no, on/off, 1/0), got {value!r}")
    if want is int:
        return _integer(opt, value)
    if want is float:
        try:
            number = float(value) if isinstance(value, (str, numbers.Real)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None:
            raise ConfigError(f"{opt} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{opt} must be a finite number, got {value!r}")
        return number
    if want is list:  # synthetic_shape: [1, 8, 8] from YAML, "1,8,8" or "1x8x8" from the command line
        parts = value.lower().replace("x", ",").split(",") if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)):
            raise ConfigError(f"{opt} must be a list of sizes like 1,8,8, got {value!r}")
        return [_integer(opt, part) for part in parts]
    if not isinstance(value, str):
        raise ConfigError(f"{opt} must be text, got {value!r}")
    return value


def read_yaml(path: str | Path) -> dict:
    """A config file's options; unknown keys are an error, not silently ignored."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must be a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} in {path}; known: {', '.join(FIELDS)}")
    return values


def make_config(file: str | Path | None = None, **overrides) -> Config:
    """Defaults, then the YAML file, then every override that is not None (the CLI's unset options)."""
    values = read_yaml(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    return Config(**values).validate()


def save_config(cfg: Config | dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg if isinstance(cfg, dict) else cfg.to_dict(), sort_keys=False))
