"""Run configuration: one flat dataclass of hyper-parameters, read from YAML, overridden by the CLI."""

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad option value; the message names the option and how to fix it."""


@dataclass
class Config:
    # data
    dataset: str = "cifar10"
    data_dir: str = "data"
    validation: float = 0.0  # > 0: hold out this share of train and report accuracy on it instead of test
    synthetic_train: int = 5000  # only for --dataset synthetic
    synthetic_test: int = 1000
    synthetic_classes: int = 10
    synthetic_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    # model and memory
    encoder: str = "conv1"
    dim: int = 128
    topk: int = 256  # K cells read per query; 0 = dense exact read over all N cells
    temperature: float = 0.05
    eta: float = 0.5  # momentum of the memory write: m <- normalise(eta m + (1 - eta) u)
    head: str = "memory"  # "softmax": the parametric baseline, the same encoder with a linear softmax head
    support_sample: int = 0  # > 0: the seed's mode, M random support images re-encoded every batch
    # optimisation
    epochs: int = 10
    # A wall-clock budget for training steps (seconds): training stops at the first step past it, and the
    # learning-rate schedule runs to whichever of epochs and seconds ends first. For a fair comparison with
    # a slow method (the seed's support sample) at the time another method took.
    max_seconds: float | None = None
    batch_size: int = 128
    # The encoder's output is L2-normalised, so the gradient reaching its weights shrinks as they grow:
    # a large SGD rate is right here (MNIST/conv1, batch 256, validation after 1 epoch: lr 0.05 93.7%, 0.5 96.7%,
    # 1.5 97.8%, 4 97.2%).
    # The softmax baseline's logits are not normalised and take the usual small rate.
    lr: float | None = None  # None: 1.0 for the memory head, 0.01 for the softmax head
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    augment: bool = True  # crop + flip for natural images; digits are never augmented
    # index
    index: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    train_nprobe: int | None = None  # a training read's IVF depth (None: ~4K candidates, see index/params.py)
    pq_m: int | None = None
    hnsw_m: int | None = None
    ef_search: int | None = None
    fp16: bool = False
    rebuild_every: str = "epoch"  # N steps, "epoch", or "auto" (when measured staleness passes a threshold)
    staleness_threshold: float = 0.02
    background_rebuild: bool = False
    # run
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    eval_batch_size: int = 1024

    def validate(self) -> "Config":
        """Catch bad values before any work, each with the option to change."""
        if self.lr is None:
            self.lr = 1.0 if self.head == "memory" else 0.01
        positive = ("dim", "epochs", "batch_size", "eval_batch_size", "lr", "max_seconds")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"--{flag(name)} must be positive, got {getattr(self, name)}")
        from sam_cls.model import ENCODERS

        if self.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.encoder!r}: choose one of {', '.join(ENCODERS)} (--encoder)")
        if self.head not in ("memory", "softmax"):
            raise ConfigError(f"--head must be memory or softmax, got {self.head!r}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.support_sample < 0 or self.support_sample == 1:
            raise ConfigError(f"--support-sample must be 0 (off) or at least 2, got {self.support_sample}")
        if self.topk < 0:
            raise ConfigError(f"--topk must be >= 0 (0 = dense read), got {self.topk}")
        if not 0.0 <= self.eta < 1.0:
            raise ConfigError(f"--eta must be in [0, 1), got {self.eta}")
        if not 0.0 <= self.validation < 1.0:
            raise ConfigError(f"--validation must be a fraction in [0, 1), got {self.validation}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self.rebuild_every = str(self.rebuild_every)
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


FIELDS = {f.name for f in dataclasses.fields(Config)}


def read_yaml(path: str | Path) -> dict:
    """A config file's options; unknown keys are an error, not silently ignored."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must be a mapping of option: value")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} in {path}; known: {', '.join(sorted(FIELDS))}")
    return values


def coerce(name: str, value):
    """A YAML or CLI value as its field's type, so `topk: "5"` works and `topk: five` names the option."""
    if value is None:
        return value
    declared = Config.__dataclass_fields__[name].type
    # `int | None` -> int; a list field (synthetic_shape) keeps its value as given.
    members = (declared,) if typing.get_origin(declared) is list else typing.get_args(declared) or (declared,)
    kind = next((k for k in members if k in (int, float)), None)
    if kind is not None and not isinstance(value, bool):
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r} (--{flag(name)})") from None
    return value


def make_config(file: str | Path | None = None, **overrides) -> Config:
    """Defaults, then the YAML file, then every override that is not None (the CLI's unset options)."""
    values = read_yaml(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    return Config(**{k: coerce(k, v) for k, v in values.items()}).validate()


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
