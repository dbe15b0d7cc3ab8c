"""Training: the encoder by backprop through memory reads, the memory by its mode's writes, the index by refresh."""

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sam_cls.checkpoint import CheckpointError, RunDir, check_resumable, fault_point
from sam_cls.config import Config, ConfigError, TrainingError, make_config
from sam_cls.copies import CopyStyle, cell_images, deform, encode_cells
from sam_cls.data import Dataset, augment
from sam_cls.evaluate import encode_all
from sam_cls.images import background_level
from sam_cls.index import IndexRefresher
from sam_cls.memory import MemoryBank
from sam_cls.modes import lays_out_memory, make_mode
from sam_cls.phases import phase
from sam_cls.read import ReadRule
from sam_cls.setup import get_dataset, index_params, make_encoder, resolve_device, start_network
from sam_cls.tune import tune_memory


class Trainer:
    """Holds everything one run mutates, so a checkpoint is exactly `state_dict()`."""

    clock = staticmethod(time.perf_counter)  # times the steps against --max-seconds (tests replace it)
    tunes_read = True  # a sharded memory (DistributedTrainer) holds a share of the cells: it keeps the read as trained

    def __init__(self, cfg: Config, log=print, data: Dataset | None = None, module: torch.nn.Module | None = None):
        """data: the data set when given from Python (else cfg names it); module: the user network of
        `--encoder module`."""
        self.cfg, self.log = cfg, log
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)  # weight initialisation; batches and crops have generators of their own
        self.data = get_dataset(cfg, log, data)
        n = len(self.data.train_y) * cfg.copies  # cells: copy c of image e is cell c * N + e
        if cfg.topk > n - cfg.copies - 1:
            raise ConfigError(f"--topk {cfg.topk} is larger than the memory allows ({n} cells, {cfg.copies} excluded "
                              f"as the query's own): use --topk <= {n - cfg.copies - 1}, or 0 for the dense read")
        if cfg.support_sample > n:
            raise ConfigError(f"--support-sample {cfg.support_sample} exceeds the {n} training images")
        # Data lives on the training device and is augmented there in batches (no per-image Python work).
        self.train_x, self.train_y = self.data.train_x.to(self.device), self.data.train_y.to(self.device)
        self.cell_y = self.train_y.repeat(cfg.copies)  # every cell's label; batches draw cells, not images
        self.copy_style = CopyStyle.of(cfg)  # what its copies and deformed queries are
        self.encoder = make_encoder(cfg, self.data, module).to(self.device)
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
        self.memory: MemoryBank | None = None  # encoded by prepare(), unless a checkpoint brought it
        self.refresher: IndexRefresher | None = None  # made by prepare(), over the memory
        self.resume_centroids: torch.Tensor | None = None  # a checkpoint's IVF centroids, for prepare()
        self.committed = False  # whether a checkpoint of this run exists (for the divergence message)
        self.read: dict | None = None  # the read rule tuned at the end of training (tune_read)
        self.history: list[dict] = []  # each committed epoch's metrics record: metrics.jsonl mirrors them

    def lr_factor(self, step: int) -> float:
        """Linear warm-up then linear decay to zero over the run's progress: by steps, or by seconds where
        --max-seconds ends first."""
        total = max(1, self.total_steps)  # --epochs 0 makes no step, but the scheduler asks once
        done = step / total
        if self.cfg.max_seconds:
            done = max(done, self.train_seconds / self.cfg.max_seconds)
        warmup = max(1, round(self.cfg.warmup_epochs * self.steps_per_epoch)) / total  # as a share of the run
        return min((done + 1 / total) / warmup, max(0.0, (1 - done) / max(1e-9, 1 - warmup)))

    def out_of_time(self) -> bool:
        return bool(self.cfg.max_seconds) and self.train_seconds >= self.cfg.max_seconds

    def state_dict(self) -> dict:
        centroids = self.refresher.centroids() if self.refresher is not None else None
        return {
            "format": 1, "config": self.cfg.to_dict(), "encoder": self.encoder.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "memory": self.memory.state_dict(),
            # An IVF index's coarse centroids: the next rebuild's k-means starts from them, so a resumed run
            # rebuilds this very index from them (no k-means) to continue as the uninterrupted run would.
            **({"index_centroids": centroids} if centroids is not None else {}),
            # What using the run needs without its data set: class names and the input shape.
            "data": {"name": self.cfg.dataset, "classes": list(self.data.classes),
                     "image_shape": list(self.data.image_shape), "train_images": len(self.train_y),
                     "background": background_level(self.data.train_x)},  # for transparent images
            "step": self.step, "epoch": self.epoch, "train_seconds": self.train_seconds, "history": list(self.history),
            "device_type": self.device.type,
            "network": self.encoder.recipe,  # how to build the network again: the weights above are all it keeps
            "rng": {"torch": torch.get_rng_state(), "perm": self.perm_gen.get_state(), "pass": self.pass_rng,
                    "aug": self.aug_gen.get_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        check_resumable(state, self.cfg, self.device.type)
        self.load_training(state)
        self.memory = MemoryBank.from_state_dict(state["memory"], self.device)
        if self.memory.size != len(self.cell_y):
            raise CheckpointError(f"checkpoint memory has {self.memory.size} cells but the data set makes "
                                  f"{len(self.cell_y)} ({self.cfg.copies} per training image): check --dataset/--data-dir")
        self.resume_centroids = state.get("index_centroids")  # absent in older checkpoints: a cold k-means

    def load_training(self, state: dict) -> None:
        """Everything but the memory: encoder, optimiser, schedule, progress and generators (a sharded run's
        ranks share these and each load a memory of their own)."""
        if state.get("edited"):
            raise CheckpointError("the run's memory was changed by `sam-cls add`, `forget` or `rebuild-index "
                                  "--copies` since it trained, so training cannot continue from it: train a new "
                                  "run with --out")
        try:
            self.encoder.load_state_dict(state["encoder"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint's {self.cfg.encoder} encoder does not fit this version's "
                                  f"({str(e).splitlines()[0]}): train a new run with --out") from e
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history = list(state.get("history", []))  # absent before checkpoints kept them (see _fit)
        self.committed = True
        self.train_seconds = state.get("train_seconds", 0.0)
        torch.set_rng_state(state["rng"]["torch"])
        self.perm_gen.set_state(state["rng"]["perm"])
        self.pass_rng = state["rng"].get("pass", self.pass_rng)
        self.aug_gen.set_state(state["rng"]["aug"])

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """The pixels of cells idx: training images, or their deformed copies (regenerated, never stored)."""
        cfg = self.cfg
        x = self.train_x[idx] if cfg.copies == 1 else cell_images(self.train_x, idx, cfg.seed, self.copy_style)
        if cfg.deform_queries:
            x = self.deform_queries(idx, x)
        return augment(x, self.aug_gen) if cfg.augment and self.data.natural else x

    def deform_queries(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A --deform-queries share of the batch as fresh deformations of their images, never seen before."""
        # A stored copy is one of C fixed deformations; a fresh one each step (copy numbers past any memory's,
        # drawn from the crop generator, so a resumed run draws the same) teaches the encoder the invariance
        # itself, and the copies then land near their image instead of adding unreliable cells.
        n, gen = len(self.train_y), self.aug_gen
        chosen = torch.rand(len(idx), generator=gen, device=gen.device) < self.cfg.deform_queries
        fresh = torch.randint(1 << 20, 1 << 31, (len(idx),), generator=gen, device=gen.device)
        examples = (idx % n).to(x.device)
        moved = deform(self.train_x[examples], examples, torch.where(chosen, fresh, 0).to(x.device), self.cfg.seed,
                       self.copy_style)
        return torch.where(chosen.to(x.device)[:, None, None, None], moved, x)

    def diverged(self, value) -> TrainingError:
        cfg = self.cfg
        kept = f"the checkpoint of epoch {self.epoch} is intact" if self.committed else "no checkpoint was written"
        return TrainingError(f"loss became {value} at step {self.step} (epoch {self.epoch + 1}): lower --lr (now "
                             f"{cfg.lr}) or raise --temperature (now {cfg.temperature}); {kept}")

    def train_epoch(self, max_steps: int | None = None) -> dict:
        """The rest of the current pass over the training set (cut short by --max-seconds or `max_steps`).

        The one training loop: a sharded run (DistributedTrainer) changes only the hooks below it.
        """
        cfg, n = self.cfg, len(self.cell_y)
        self.encoder.train()
        first = self.step % self.steps_per_epoch  # > 0 only when a time budget cut the pass and a resume continues it
        if first == 0:
            self.pass_rng = self.perm_gen.get_state()
            perm = torch.randperm(n, generator=self.perm_gen)
        else:  # the cut pass's own order, regenerated; the support-sample stream goes on from where it was
            perm = torch.randperm(n, generator=torch.Generator().set_state(self.pass_rng))
        perm = perm.to(self.device)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, seen: this process's
        start = time.perf_counter()
        last = self.steps_per_epoch if max_steps is None else min(self.steps_per_epoch, first + max_steps)
        bar = tqdm(range(first, last), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   mininterval=1.0, disable=not self.shows_progress)
        for i in bar:
            step_start = self.clock()
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]  # the global batch
            # Named phases, for torch.profiler and benchmarks/profile_run.py; free when neither asks.
            with phase("batch"):
                x, y = self.step_batch(idx)
            with phase("encoder"):
                u = self.mode.embed(x)
            with phase("read"):
                log_probs = self.step_read(u, idx)
            loss, nll = self.step_loss(log_probs, y, len(idx))
            if i % 20 == 0:  # a host sync every step would stall a GPU; every 20 still catches a NaN early
                value = self.mean_loss(nll, len(idx))
                if not math.isfinite(value):
                    raise self.diverged(value)
                rate = totals[2].item() / max(1e-9, time.perf_counter() - start)
                bar.set_postfix(loss=f"{value:.3f}", img_s=f"{rate:.0f}")
            with phase("backward"):
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
            with phase("optimizer"):
                self.opt.step()
                self.sched.step()
            # Training accuracy as the seed's curves show it: the augmented batch, its own cell excluded.
            totals += torch.stack([nll.double(), (log_probs.detach().argmax(1) == y).sum().double(),
                                   torch.tensor(float(len(y)), dtype=torch.float64, device=self.device)])
            self.step += 1
            self.after_step(idx, u, nll)
            self.train_seconds += self.step_seconds(self.clock() - step_start)
            if self.out_of_time():
                break
        bar.close()
        loss_sum, correct, seen = self.epoch_totals(totals)
        mean_loss = loss_sum / seen
        if not math.isfinite(mean_loss):
            raise self.diverged(mean_loss)
        return {"train_loss": mean_loss, "train_acc": 100.0 * correct / seen,
                "images_per_s": seen / (time.perf_counter() - start)}

    # -- the loop's hooks: one process here, a rank's share of each batch in DistributedTrainer -----------
    shows_progress = True  # the progress bar (a sharded run shows rank 0's only)

    def step_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixels and labels this process trains on, of the global batch of cells idx."""
        return self.batch(idx), self.cell_y[idx]

    def step_read(self, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities of the batch through the mode's read; a non-finite embedding stops the run."""
        if self.mode.checks_finite(u) and not torch.isfinite(u).all():
            raise self.diverged("nan")
        return self.mode.log_probs(u, idx, self.step)

    def step_loss(self, log_probs: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to differentiate, and this process's summed NLL (detached) for the epoch's totals."""
        loss = F.nll_loss(log_probs, y)
        return loss, loss.detach() * len(y)

    def mean_loss(self, nll: torch.Tensor, batch: int) -> float:
        """The global batch's mean loss (a host sync)."""
        return nll.item() / batch

    def after_step(self, idx: torch.Tensor, u: torch.Tensor, nll: torch.Tensor) -> None:
        """The mode's writes and index refresh, once the optimiser has stepped."""
        self.mode.after_step(idx, u, self.step)

    def step_seconds(self, elapsed: float) -> float:
        """The seconds a step counts against --max-seconds."""
        return elapsed

    def epoch_totals(self, totals: torch.Tensor) -> list[float]:
        """(loss sum, correct, seen) over the pass."""
        return totals.tolist()

    def prepare(self) -> None:
        """Memory (encoded now, unless a checkpoint brought it), the index over it, and the read mode."""
        cfg = self.cfg
        if self.memory is None:
            start_network(self.encoder, cfg, self.train_x, self.log)
            self.memory = MemoryBank(self.encode_memory(), self.cell_y)
        self.refresher = IndexRefresher(self.memory.embeddings, index_params(cfg, self.device), k=max(cfg.topk, 1) + 1,
                                        rebuild_every=rebuild_policy(cfg), staleness_threshold=cfg.staleness_threshold,
                                        background=cfg.background_rebuild, log=self.log, seed=cfg.seed,
                                        centroids=self.resume_centroids,
                                        reorder=self.memory.reorder if lays_out_memory(cfg) else None)
        self.mode = make_mode(cfg, self.encoder, self.memory, self.refresher, self.data.num_classes, self.train_y,
                              self.batch, self.perm_gen)

    def refresh_memory(self) -> None:
        """Re-encode every cell with the current encoder (no augmentation): the memory evaluation reads."""
        self.memory.replace(self.encode_memory(), self.step)

    def encode_memory(self) -> torch.Tensor:
        cfg = self.cfg
        if cfg.copies == 1:
            return encode_all(self.encoder, self.train_x, cfg.eval_batch_size, desc="memory")
        return encode_cells(self.encoder, self.train_x, cfg.copies, cfg.seed, cfg.eval_batch_size,
                            style=self.copy_style)

    def finished(self) -> bool:
        """Whether the epoch just ended is the run's last (by epochs or by --max-seconds)."""
        return self.step >= self.total_steps or self.out_of_time()

    def tune_read(self) -> tuple[dict, torch.Tensor | None]:
        """Choose and keep the read predictions will use (sam_cls/tune.py): what the metrics line records of it,
        and the test split's embeddings, for the epoch's test read to classify again under the tuned rule."""
        mode, cfg = self.mode, self.cfg
        if not cfg.tune_read or cfg.head != "memory" or not self.tunes_read:
            return {}, None
        start = time.perf_counter()
        facts = mode.facts()
        # Encoded once: the read as trained, the tuning's held-out share (with --validation, the data set's test
        # split is that share: setup.get_dataset) and the tuned test read all classify these.
        u = encode_all(self.encoder, self.data.test_x, cfg.eval_batch_size, desc="test")
        validation = (u, self.data.test_y.to(u.device)) if cfg.validation else None
        as_trained = mode.accuracy(self.data, u)
        self.read = tune_memory(self.memory, self.refresher.index, mode.rule, self.data.num_classes, facts,
                                validation, cfg.seed)
        mode.rule = ReadRule.from_dict(self.read["rule"])
        self.log(f"read tuned in {time.perf_counter() - start:.1f}s: {self.read['rule']}")
        return {"test_acc_as_trained": round(as_trained, 3), "read": self.read["rule"]}, u

    def save(self, run: RunDir) -> None:
        state = self.state_dict()
        if self.read is not None and self.finished():  # the rule tuned for this memory, at the run's end only
            state["read"] = self.read
        run.commit(state, self.refresher.index)

    def fit(self, run: RunDir) -> dict:
        cfg = self.cfg
        with phase("prepare"):
            self.prepare()
        record: dict = {}
        run_start = time.perf_counter()
        if cfg.epochs == 0:  # --epochs 0: the memory of the network as built or given, measured and committed
            record = self.end_epoch(run, run_start, self.refresher.rebuilds, {"epoch": 0, "step": 0})
            self.log(f"epoch 0 (no training)  test acc {record['test_acc']:.2f}%  {record['seconds']:.1f}s")
        while self.epoch < cfg.epochs and not self.out_of_time():
            epoch_start, rebuilds_before = time.perf_counter(), self.refresher.rebuilds
            epoch = self.train_epoch()
            self.epoch = self.step // self.steps_per_epoch  # whole passes; a time budget may cut the last one short
            with phase("re-encode"):
                self.refresh_memory()
            record = self.end_epoch(run, epoch_start, rebuilds_before, {
                "epoch": round(self.step / self.steps_per_epoch, 4), "step": self.step,
                "train_loss": round(epoch["train_loss"], 5), "train_acc": round(epoch["train_acc"], 3),
                "images_per_s": round(epoch["images_per_s"], 1)})
            self.log(f"epoch {record['epoch']:g}/{cfg.epochs}  loss {epoch['train_loss']:.4f}  train acc "
                     f"{epoch['train_acc']:.2f}%  test acc {record['test_acc']:.2f}%  {epoch['images_per_s']:.0f} "
                     f"img/s  {record['seconds']:.1f}s  rebuilds {record['index_rebuilds']}")
        if self.out_of_time():
            self.log(f"stopped by --max-seconds {cfg.max_seconds:g} after {record.get('epoch', 0):g} epochs")
        return {"test_acc": record.get("test_acc"), "epochs": record.get("epoch"),
                "seconds": round(time.perf_counter() - run_start, 2), "run_dir": str(run.path),
                "images_per_s": record.get("images_per_s")}

    def end_epoch(self, run: RunDir, start: float, rebuilds_before: int, record: dict) -> dict:
        """An epoch's end over the memory as it now is: the index rebuilt, the read tuned after the last epoch,
        the test split read, and the record committed with the checkpoint."""
        with phase("rebuild"):  # the evaluation depth by measured recall, unless --nprobe fixed it
            self.refresher.rebuild("evaluation", calibrate=self.cfg.nprobe is None)
        with phase("tune read"):
            tuned, test_u = self.tune_read() if self.finished() else ({}, None)
        with phase("test"):
            test_acc = self.mode.accuracy(self.data) if test_u is None else self.mode.accuracy(self.data, test_u)
        record = {**record, "test_acc": round(test_acc, 3), "seconds": round(time.perf_counter() - start, 2),
                  "index_rebuilds": self.refresher.rebuilds - rebuilds_before, **tuned}
        self.history.append(record)
        fault_point("metrics")
        with phase("checkpoint"):
            self.save(run)  # metrics.jsonl gets the record with the commit, never before it
        self.committed = True
        return record


def rebuild_policy(cfg: Config) -> int | str | None:
    """--rebuild-every as IndexRefresher takes it: steps, "auto", or None for "epoch" (fit() rebuilds before
    each evaluation anyway)."""
    every = {"auto": "auto", "epoch": None}.get(cfg.rebuild_every, cfg.rebuild_every)
    return every if every in ("auto", None) else int(every)


def fresh_run_dir(cfg: Config, log=print) -> Path:
    """runs/<dataset>-<encoder>-k<K>, with -2, -3, ... appended rather than overwrite an earlier run (and said,
    since the commands after it name the directory)."""
    base = Path("runs") / f"{cfg.dataset}-{cfg.encoder}-k{cfg.topk}"
    path, n = base, 1
    while (path / "checkpoint.pt").exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    if path != base:
        log(f"{base} holds a run already: this one is written to {path} (--out RUN_DIR names the directory)")
    return path


def train(cfg: Config, resume: bool = False, log=print, **given) -> dict:
    """Train a new run (or, with resume, continue the run in cfg.out under cfg); returns the last epoch's summary.
    given: Trainer's `data` and `module`, where Python hands them over (sam_cls.fit). A run that fails before its
    first commit leaves no folder it created behind."""
    if resume and not cfg.out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    run = RunDir(cfg.out or fresh_run_dir(cfg, log))
    cfg.out = str(run.path)
    created = _missing(run.path) + _missing(Path(cfg.data_dir))
    try:
        return _fit(run, lambda state: cfg, resume, log, **given)
    except BaseException:
        _remove_empty(created)
        raise


def _missing(path: Path) -> list[Path]:
    """path and those of its parents that do not exist yet."""
    return [p for p in (path, *path.parents) if not p.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created that hold nothing but its lock's record, deepest first."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".lock"}:
            with contextlib.suppress(OSError):  # another process wrote there since: it is not ours to remove
                (folder / ".lock").unlink(missing_ok=True)
                folder.rmdir()


def resume(out: str, log=print, **overrides) -> dict:
    """Continue the run in `out` under its checkpoint's own config, with these options changed (e.g. epochs)."""
    return _fit(RunDir(out), lambda state: make_config(None, **{**state["config"], **overrides, "out": str(out)}),
                True, log)


def _fit(run: RunDir, config_for, resume: bool, log, **given) -> dict:
    run.log = log
    with run.lock():  # one writer: a second train, resume, add, forget or rebuild-index fails at once
        if not resume and run.checkpoint.exists():
            raise ConfigError(f"{run.path} already holds a run: pass --resume to continue it, or a new --out")
        state = run.load_state(log=log) if resume else None
        cfg = config_for(state)
        trainer = Trainer(cfg, log, **given)
        if state is not None:
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
        if state is not None and "history" not in state:  # a checkpoint from before it kept its records
            trainer.history = run.load_metrics()
        return trainer.fit(run)
