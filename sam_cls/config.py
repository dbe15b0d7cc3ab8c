"""Run configuration: one flat dataclass of hyper-parameters, read from YAML, overridden by the CLI."""

import dataclasses
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
    support_sample: int = 0  # > 0: the seed's mode, M random support images re-encoded every batch
    # optimisation
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    augment: bool = True  # crop + flip for natural images; digits are never augmented
    # index
    index: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
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
        positive = ("dim", "epochs", "batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{flag(name)} must be positive, got {getattr(self, name)}")
        from sam_cls.model import ENCODERS

        if self.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.encoder!r}: choose one of {', '.join(ENCODERS)} (--encoder)")
        if self.topk < 0:
            raise ConfigError(f"--topk must be >= 0 (0 = dense read), got {self.topk}")
        if not 0.0 <= self.eta < 1.0:
            raise ConfigError(f"--eta must be in [0, 1), got {self.eta}")
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


def make_config(file: str | Path | None = None, **overrides) -> Config:
    """Defaults, then the YAML file, then every override that is not None (the CLI's unset options)."""
    values = read_yaml(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**values).validate()


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
