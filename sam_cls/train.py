"""Training: encoder by backprop through sparse memory reads, memory by momentum writes, index by refresh."""

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from tqdm import tqdm

from sam_cls.checkpoint import CheckpointError, RunDir, atomic_save, load_tensors
from sam_cls.config import Config, ConfigError
from sam_cls.data import Dataset, SyntheticSpec, augment, load_dataset, split_validation
from sam_cls.evaluate import accuracy, encode_all, head_accuracy
from sam_cls.index import IndexParams, IndexRefresher
from sam_cls.memory import MemoryBank
from sam_cls.model import Encoder, build_encoder
from sam_cls.read import class_log_probs, dense_read, exclusion_mask, sparse_read

# Options a resumed run may not change: they define what the checkpoint's tensors and optimizer state mean.
STRUCTURAL = ("dataset", "validation", "encoder", "head", "dim", "synthetic_train", "synthetic_classes",
              "synthetic_shape", "seed", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message says what to change."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device: use --device cpu or auto")
    return torch.device(name)


def index_params(cfg: Config, device: torch.device) -> IndexParams:
    return IndexParams(kind=cfg.index, nlist=cfg.nlist, nprobe=cfg.nprobe, train_nprobe=cfg.train_nprobe,
                       pq_m=cfg.pq_m, hnsw_m=cfg.hnsw_m, ef_search=cfg.ef_search, fp16=cfg.fp16, device=device.type)


def get_dataset(cfg: Config, log) -> Dataset:
    spec = SyntheticSpec(n_train=cfg.synthetic_train, n_test=cfg.synthetic_test, num_classes=cfg.synthetic_classes,
                         shape=tuple(cfg.synthetic_shape), seed=cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data_dir, synthetic=spec, log=log)
    # Choices made by looking at accuracy are made on a split of train; the test split stays unseen.
    return split_validation(data, cfg.validation, cfg.seed) if cfg.validation else data


def make_encoder(cfg: Config, data: Dataset) -> Encoder:
    """The run's encoder (with a softmax head for the parametric baseline), sized for its data."""
    return build_encoder(cfg.encoder, data.image_shape, cfg.dim, data.mean, data.std,
                         data.num_classes if cfg.head == "softmax" else None)


def fresh_run_dir(cfg: Config) -> Path:
    """runs/<dataset>-<encoder>-k<K>, with -2, -3, ... appended rather than overwrite an earlier run."""
    base = Path("runs") / f"{cfg.dataset}-{cfg.encoder}-k{cfg.topk}"
    path, n = base, 1
    while (path / "checkpoint.pt").exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class Trainer:
    """Holds everything one run mutates, so a checkpoint is exactly `state_dict()`."""

    clock = staticmethod(time.perf_counter)  # times the steps against --max-seconds (tests replace it)

    def __init__(self, cfg: Config, log=print):
        self.cfg, self.log = cfg, log
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)  # weight initialisation; batches and crops have generators of their own
        self.data = get_dataset(cfg, log)
        n = len(self.data.train_y)
        if cfg.topk > n - 2:
            raise ConfigError(f"--topk {cfg.topk} is larger than the memory allows ({n} cells, one excluded as the "
                              f"query's own): use --topk <= {n - 2}, or 0 for the dense read")
        if cfg.support_sample > n:
            raise ConfigError(f"--support-sample {cfg.support_sample} exceeds the {n} training images")
        # Data lives on the training device and is augmented there in batches (no per-image Python work).
        self.train_x, self.train_y = self.data.train_x.to(self.device), self.data.train_y.to(self.device)
        self.encoder = make_encoder(cfg, self.data).to(self.device)
        self.opt = torch.optim.SGD(self.encoder.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                   weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.train_seconds = 0.0  # time spent in training steps, against --max-seconds
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.perm_gen = torch.Generator().manual_seed(cfg.seed)  # batch order and support samples
        self.aug_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)  # crops and flips
        self.step, self.epoch = 0, 0
        self.pass_rng = self.perm_gen.get_state()  # the batch order of the current pass, to resume inside it
        self.memory: MemoryBank | None = None
        self.refresher: IndexRefresher | None = None  # made by prepare(), over the memory
        self.resume_centroids: torch.Tensor | None = None  # a checkpoint's IVF centroids, for prepare()

    def progress(self, step: int) -> float:
        """Share of the run done after `step` steps: by steps, or by seconds where a time budget ends first."""
        done = step / self.total_steps
        if self.cfg.max_seconds:
            done = max(done, self.train_seconds / self.cfg.max_seconds)
        return done

    def lr_factor(self, step: int) -> float:
        """Linear warm-up then linear decay to zero, over the run's progress: robust for few-epoch CPU runs."""
        total = self.total_steps
        warmup = max(1, round(self.cfg.warmup_epochs * self.steps_per_epoch)) / total  # as a share of the run
        done = self.progress(step)
        return min((done + 1 / total) / warmup, max(0.0, (1 - done) / max(1e-9, 1 - warmup)))

    def out_of_time(self) -> bool:
        """Whether --max-seconds of training steps are spent."""
        return bool(self.cfg.max_seconds) and self.train_seconds >= self.cfg.max_seconds

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        centroids = self.refresher.centroids() if self.refresher is not None else None
        return {
            "format": 1,
            "config": self.cfg.to_dict(),
            "encoder": self.encoder.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "memory": self.memory.state_dict(),
            # An IVF index's coarse centroids: the next rebuild's k-means starts from them, so a resumed run
            # rebuilds this very index from them (no k-means) to continue as the uninterrupted run would.
            **({"index_centroids": centroids} if centroids is not None else {}),
            "step": self.step,
            "epoch": self.epoch,
            "train_seconds": self.train_seconds,
            "device_type": self.device.type,
            "rng": {"torch": torch.get_rng_state(), "perm": self.perm_gen.get_state(), "pass": self.pass_rng,
                    "aug": self.aug_gen.get_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("config", {})
        changed = [k for k in STRUCTURAL if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed:
            raise CheckpointError(f"checkpoint was trained with {', '.join(f'{k}={saved[k]!r}' for k in changed)}; "
                                  f"resume with the same values or start a new run with --out")
        if state.get("device_type", self.device.type) != self.device.type:
            # The crop generator's state is device-specific; a run continues where it was trained.
            raise CheckpointError(f"checkpoint was trained on {state['device_type']}: resume it with --device "
                                  f"{state['device_type']}")
        try:
            self.encoder.load_state_dict(state["encoder"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint's {self.cfg.encoder} encoder does not fit this version's "
                                  f"({str(e).splitlines()[0]}): train a new run with --out") from e
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.memory = MemoryBank.from_state_dict(state["memory"], self.device)
        if self.memory.size != len(self.train_y):
            raise CheckpointError(f"checkpoint memory has {self.memory.size} cells but the data set has "
                                  f"{len(self.train_y)} training images: check --dataset/--data-dir")
        self.step, self.epoch = state["step"], state["epoch"]
        self.resume_centroids = state.get("index_centroids")  # absent in older checkpoints: a cold k-means
        self.train_seconds = state.get("train_seconds", 0.0)
        torch.set_rng_state(state["rng"]["torch"])
        self.perm_gen.set_state(state["rng"]["perm"])
        self.pass_rng = state["rng"].get("pass", self.pass_rng)
        self.aug_gen.set_state(state["rng"]["aug"])

    # -- one step -----------------------------------------------------------------------------------------
    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.train_x[idx]
        if self.cfg.augment and self.data.natural:
            x = augment(x, self.aug_gen)
        return x

    def log_probs(self, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The training read for the configured mode; the query's own cell never counts."""
        cfg, mem, C = self.cfg, self.memory, self.data.num_classes
        if cfg.support_sample:
            # The seed's mode: M random support images re-encoded with gradients, dense softmax over them.
            support = torch.randperm(len(self.train_y), generator=self.perm_gen)[: cfg.support_sample]
            support = support.to(self.device)
            s = self.encoder(self.batch(support))
            scores = (u @ s.T / cfg.temperature).masked_fill(support[None, :] == idx[:, None], float("-inf"))
            return class_log_probs(scores, self.train_y[support][None, :], C)
        own = mem.rows[idx]  # the batch's own cells: the memory keeps them in its index's layout, not by example
        if cfg.topk == 0:
            return dense_read(u, mem.embeddings, mem.labels, C, cfg.temperature, exclude_ids=own)
        # K + 1 candidates so that dropping the query's own cell still leaves K.
        with record_function("search"):
            _, ids = self.refresher.search(u.detach(), cfg.topk + 1)
        ids = ids.to(self.device)
        return sparse_read(u, ids, mem.embeddings, mem.labels, C, cfg.temperature, exclude=exclusion_mask(ids, own))

    def diverged(self, value) -> TrainingError:
        cfg = self.cfg
        return TrainingError(f"loss became {value} at step {self.step} (epoch {self.epoch + 1}): lower --lr (now "
                             f"{cfg.lr}) or raise --temperature (now {cfg.temperature}); the last checkpoint is intact")

    def train_epoch(self, max_steps: int | None = None) -> dict:
        """The rest of the current pass over the training set (cut short by --max-seconds or `max_steps`)."""
        cfg, n = self.cfg, len(self.train_y)
        self.encoder.train()
        first = self.step % self.steps_per_epoch  # > 0 only when a time budget cut the pass and a resume continues it
        if first == 0:
            self.pass_rng = self.perm_gen.get_state()
            perm = torch.randperm(n, generator=self.perm_gen)
        else:  # the cut pass's own order, regenerated; the support-sample stream goes on from where it was
            perm = torch.randperm(n, generator=torch.Generator().set_state(self.pass_rng))
        perm = perm.to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen, start = 0, time.perf_counter()
        last = self.steps_per_epoch if max_steps is None else min(self.steps_per_epoch, first + max_steps)
        bar = tqdm(range(first, last), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   mininterval=1.0)
        for i in bar:
            step_start = self.clock()
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            # Named phases, for torch.profiler (benchmarks/profile_step.py); free when no profiler runs.
            with record_function("batch"):
                x = self.batch(idx)
            if cfg.head == "softmax":
                with record_function("encoder"):
                    u, log_probs = None, F.log_softmax(self.encoder.logits(x), dim=1)
            else:
                with record_function("encoder"):
                    u = self.encoder(x)
                # Diverged weights show first as non-finite embeddings, which a faiss index cannot search:
                # check before such a search (it syncs with the host anyway), and on the CPU (free). Other
                # GPU steps leave the NaN to the loss check below (within 20 steps) rather than make the
                # host wait for the GPU every step.
                faiss_search = cfg.topk and not cfg.support_sample and not self.refresher.index.searches_non_finite
                if (faiss_search or not u.is_cuda) and not torch.isfinite(u).all():
                    raise self.diverged("nan")
                with record_function("read"):
                    log_probs = self.log_probs(u, idx)
            loss = F.nll_loss(log_probs, self.train_y[idx])
            if i % 20 == 0:  # a host sync every step would stall a GPU; every 20 still catches a NaN early
                value = loss.item()
                if not math.isfinite(value):
                    raise self.diverged(value)
                bar.set_postfix(loss=f"{value:.3f}", img_s=f"{seen / max(1e-9, time.perf_counter() - start):.0f}")
            with record_function("backward"):
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
            with record_function("optimizer"):
                self.opt.step()
                self.sched.step()
            # Training accuracy as the seed's curves show it: the augmented batch, its own cell excluded.
            correct += (log_probs.detach().argmax(1) == self.train_y[idx]).sum()
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
            self.step += 1
            if u is not None and not cfg.support_sample:
                with record_function("memory write"):
                    self.memory.write(idx, u, cfg.eta, self.step)
                if cfg.topk:  # the dense read needs no index
                    with record_function("index refresh"):
                        self.refresher.step(self.step)
            self.train_seconds += self.clock() - step_start
            if self.out_of_time():
                break
        bar.close()
        mean_loss = loss_sum.item() / seen
        if not math.isfinite(mean_loss):
            raise self.diverged(mean_loss)
        return {"train_loss": mean_loss, "train_acc": 100.0 * correct.item() / seen,
                "images_per_s": seen / (time.perf_counter() - start)}

    # -- the run ----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Memory (encoded now, unless a checkpoint brought it) and the index over it: what a step reads."""
        if self.memory is None:
            self.calibrate_batchnorm()
            self.memory = MemoryBank(self.encode_memory(), self.train_y)
        cfg = self.cfg
        # "epoch" is served by the rebuild fit() forces before each evaluation.
        every = {"auto": "auto", "epoch": None}.get(cfg.rebuild_every, cfg.rebuild_every)
        every = every if every in ("auto", None) else int(every)
        self.refresher = IndexRefresher(self.memory.embeddings, index_params(cfg, self.device), k=max(cfg.topk, 1) + 1,
                                        rebuild_every=every, staleness_threshold=cfg.staleness_threshold,
                                        background=cfg.background_rebuild, log=self.log, seed=cfg.seed,
                                        centroids=self.resume_centroids,
                                        # The layout serves sparse reads; a dense or softmax run never makes one.
                                        reorder=self.memory.reorder if cfg.topk and cfg.head == "memory" else None)
        if cfg.train_nprobe and cfg.topk and self.refresher.train_nprobe is None:
            self.log(f"--train-nprobe {cfg.train_nprobe} applies to IVF indices only: the "
                     f"{self.refresher.index.kind} index searches in full")

    @torch.no_grad()
    def calibrate_batchnorm(self, images: int = 4096) -> None:
        """Real-batch statistics in fresh BatchNorm layers, so the eval-mode memory looks like train-mode queries."""
        # With a new network's running statistics (mean 0, variance 1) the first memory would be unlike the
        # queries that read it, and the first epoch would learn against noise (CIFAR-10/cnn validation after
        # one epoch: 40% without this, 62% with it).
        norms = [m for m in self.encoder.modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)]
        if not norms:
            return
        stride = max(1, len(self.train_x) // images)  # spread over the set: some formats store it class by class
        sample = self.train_x[::stride]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
        self.encoder.train()
        for i in range(0, len(sample), self.cfg.batch_size):
            self.encoder(sample[i : i + self.cfg.batch_size])
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum

    def refresh_memory(self) -> None:
        """Re-encode every cell with the current encoder (no augmentation): the memory evaluation reads."""
        self.memory.replace(self.encode_memory(), self.step)

    def encode_memory(self) -> torch.Tensor:
        return encode_all(self.encoder, self.train_x, self.cfg.eval_batch_size, desc="memory")

    def save(self, run: RunDir) -> None:
        self.refresher.index.save(run.index)
        atomic_save(self.state_dict(), run.checkpoint)  # last: the checkpoint is the commit point

    def fit(self, run: RunDir) -> dict:
        cfg = self.cfg
        self.prepare()
        record: dict = {}
        run_start = time.perf_counter()
        while self.epoch < cfg.epochs and not self.out_of_time():
            epoch_start, rebuilds_before = time.perf_counter(), self.refresher.rebuilds
            epoch = self.train_epoch()
            self.epoch = self.step // self.steps_per_epoch  # whole passes; a time budget may cut the last one short
            self.refresh_memory()
            self.refresher.rebuild("evaluation")
            if cfg.head == "softmax":
                test_acc = head_accuracy(self.encoder, self.data.test_x, self.data.test_y, cfg.eval_batch_size)
            else:
                test_acc = accuracy(self.encoder, self.data.test_x, self.data.test_y, self.memory,
                                    self.refresher.index, cfg.topk, self.data.num_classes, cfg.temperature,
                                    cfg.eval_batch_size)
            record = {"epoch": round(self.step / self.steps_per_epoch, 4), "step": self.step,
                      "train_loss": round(epoch["train_loss"], 5), "train_acc": round(epoch["train_acc"], 3),
                      "test_acc": round(test_acc, 3), "images_per_s": round(epoch["images_per_s"], 1),
                      "seconds": round(time.perf_counter() - epoch_start, 2),
                      "index_rebuilds": self.refresher.rebuilds - rebuilds_before}
            run.append_metrics(record)
            self.save(run)
            self.log(f"epoch {record['epoch']:g}/{cfg.epochs}  loss {epoch['train_loss']:.4f}  train acc "
                     f"{epoch['train_acc']:.2f}%  test acc {test_acc:.2f}%  {epoch['images_per_s']:.0f} img/s  "
                     f"{record['seconds']:.1f}s  rebuilds {record['index_rebuilds']}")
        if self.out_of_time():
            self.log(f"stopped by --max-seconds {cfg.max_seconds:g} after {record.get('epoch', 0):g} epochs")
        return {"test_acc": record.get("test_acc"), "epochs": record.get("epoch"),
                "seconds": round(time.perf_counter() - run_start, 2), "run_dir": str(run.path),
                "images_per_s": record.get("images_per_s")}


def train(cfg: Config, resume: bool = False, log=print) -> dict:
    """Train (or resume) a run; returns the last epoch's summary."""
    if resume and not cfg.out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    run = RunDir(cfg.out or fresh_run_dir(cfg))
    if resume:
        run.require_checkpoint()
        state = load_tensors(run.checkpoint)
    elif run.checkpoint.exists():
        raise ConfigError(f"{run.path} already holds a run: pass --resume to continue it, or a new --out")
    cfg.out = str(run.path)
    trainer = Trainer(cfg, log)
    if resume:
        trainer.load_state_dict(state)
        if trainer.out_of_time():
            raise ConfigError(f"{run.path} has used its --max-seconds {cfg.max_seconds:g}: pass a larger "
                              f"--max-seconds to train it further")
        if trainer.epoch >= cfg.epochs:
            raise ConfigError(f"{run.path} has already trained {trainer.epoch} epochs: pass --epochs N with N > "
                              f"{trainer.epoch} to train it further")
        log(f"resuming {run.path} at epoch {trainer.epoch}, step {trainer.step}")
    # Lines of epochs whose checkpoint never landed would otherwise repeat or outlive the run.
    run.truncate_metrics(trainer.step)
    run.path.mkdir(parents=True, exist_ok=True)
    run.save_config(cfg)
    return trainer.fit(run)
