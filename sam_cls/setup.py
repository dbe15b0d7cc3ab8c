"""From a Config to the objects a run is made of: device, data, encoder, index knobs; shared by train and use."""

import torch
from torch import nn

from sam_cls.backbones import USER_MODULE, load_init_weights
from sam_cls.config import Config, ConfigError
from sam_cls.data import Dataset, SyntheticSpec, load_dataset, split_validation
from sam_cls.index import IndexParams
from sam_cls.model import Encoder, build_encoder, calibrate_batchnorm


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when torch sees it; asking for CUDA without it is a one-line error, not a traceback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device: use --device cpu or auto")
    return torch.device(name)


def index_params(cfg: Config, device: torch.device) -> IndexParams:
    """The index knobs of a run, on the device its memory lives on."""
    return IndexParams(kind=cfg.index, nlist=cfg.nlist, nprobe=cfg.nprobe, train_nprobe=cfg.train_nprobe,
                       pq_m=cfg.pq_m, hnsw_m=cfg.hnsw_m, ef_search=cfg.ef_search, fp16=cfg.fp16, device=device.type)


def get_dataset(cfg: Config, log, given: Dataset | None = None) -> Dataset:
    """The run's data set (or one `given` from Python), with the validation split carved out of train where one
    is asked for."""
    spec = SyntheticSpec(n_train=cfg.synthetic_train, n_test=cfg.synthetic_test, num_classes=cfg.synthetic_classes,
                         shape=tuple(cfg.synthetic_shape), seed=cfg.seed)
    data = given if given is not None else load_dataset(cfg.dataset, cfg.data_dir, synthetic=spec, log=log,
                                                           skip_bad_images=cfg.skip_bad_images)
    # Choices made by looking at accuracy are made on a split of train; the test split stays unseen.
    return split_validation(data, cfg.validation, cfg.seed) if cfg.validation else data


def make_encoder(cfg: Config, data: Dataset, module: nn.Module | None = None) -> Encoder:
    """The run's encoder (with a softmax head for the parametric baseline), sized for its data; `module`: the
    user network of `--encoder module`."""
    encoder = build_encoder(cfg.encoder, data.image_shape, cfg.dim, data.mean, data.std,
                            data.num_classes if cfg.head == "softmax" else None, module)
    if cfg.freeze_backbone:
        encoder.freeze_backbone()
    return encoder


def start_network(encoder: Encoder, cfg: Config, images: torch.Tensor, log) -> None:
    """A new run's network before its first memory: the --init-weights file's weights, else (for weights new to
    the run) BatchNorm statistics estimated on the training images; given weights keep their own statistics."""
    if cfg.init_weights:
        load_init_weights(encoder.body, cfg.init_weights, cfg.encoder, log)
    elif cfg.encoder != USER_MODULE:  # a user module comes with weights (and statistics) of its own
        calibrate_batchnorm(encoder, images, cfg.batch_size)
