"""The `sam-cls` command: parse options, call the library, print. No logic lives here."""

import functools
import json
import re
import sys

import click

from sam_cls.checkpoint import RunDir
from sam_cls.cli_options import config_options
from sam_cls.config import COPY_KINDS, DEVICES, make_config


def log(message: str) -> None:
    """Progress and logs go to stderr, so stdout stays one clean result (a JSON line with --json)."""
    click.echo(message, err=True)


def shown(text) -> str:
    """A name as one line of output shows it: a newline or other control character in a class name or a path
    would break the line format (and could forge a line), so it is escaped as Python writes it."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m[0])[1:-1], str(text))


def report(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo("  ".join(f"{k}: {v}" for k, v in result.items()))


def friendly_errors(fn):
    """Known bad input ends in one line naming the value and the fix, and exit status 2; bugs still trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sam_cls.checkpoint import CheckpointError
        from sam_cls.config import ConfigError, TrainingError
        from sam_cls.data import DatasetError
        from sam_cls.index import IndexMismatchError

        try:
            return fn(*args, **kwargs)
        # ValueError too: torch, faiss and the index layer reject impossible values (e.g. nlist > N) with it.
        except (ConfigError, CheckpointError, DatasetError, IndexMismatchError, TrainingError, ImportError,
                ValueError) as e:
            click.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
            sys.exit(2)
        # A read-only folder, a full disk, a missing permission: the path and the reason, in one line. Every
        # write is atomic (a temporary file renamed into place), so nothing half-written is left visible.
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(2)

    return wrapper


# Index choice and knobs, shared by train and rebuild-index.
index_options = config_options(["index", "nlist", "nprobe", "pq_m", "hnsw_m", "ef_search", "fp16"])


@click.group()
@click.version_option(package_name="sam-cls")
def main() -> None:
    """sam-cls: a classifier that reads the K nearest of all its training examples."""


@main.command(context_settings={"max_content_width": 110})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML run config (keys are the options below, e.g. batch_size: 256); options given here "
                   "override it.")
@config_options()
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line on stdout.")
@friendly_errors
def train(config_file, resume, as_json, **options) -> None:
    """Train an encoder and its memory; writes a run directory.

    With no options it trains on mnist-mini, the 5,000 + 1,000 MNIST digits shipped with sam-cls.
    """
    from sam_cls.distributed import launched

    if launched():  # a worker of `torchrun ... -m sam_cls train`: data parallel, the memory sharded by rank
        from sam_cls.train_distributed import resume as resume_training
        from sam_cls.train_distributed import train as run_training
    else:
        from sam_cls.train import resume as resume_training
        from sam_cls.train import train as run_training

    if resume:
        from sam_cls.config import ConfigError

        if config_file or not options.get("out"):
            raise ConfigError("--resume continues the run in --out RUN_DIR with its own config: give --out, not --config")
        # Options given now (e.g. more --epochs) override the config the run's checkpoint was trained with.
        given = {k: v for k, v in options.items() if v is not None}
        result = resume_training(given.pop("out"), log=log, **given)
    else:
        result = run_training(make_config(config_file, **options), log=log)
    if result is not None:  # None: a distributed job's rank other than 0, which leaves the report to rank 0
        report(result, as_json)


BALANCED_HELP = ("Weigh every class as if it held as many cells as the others (--alpha 1): what a class added "
                 "from a few examples needs.")


def read_options(fn):
    """The read rule's changes, which every command that classifies takes (default: the run's stored rule)."""
    fn = click.option("--balanced", is_flag=True, help=BALANCED_HELP)(fn)
    fn = click.option("--alpha", type=click.FloatRange(min=0), help="Class prior: each class's mass divided by its "
                      "cell count to this power (0 = as trained, 1 = --balanced).")(fn)
    fn = click.option("--class-k", type=click.IntRange(min=0), help="Read each class's own k best cells "
                      "(0 = one top K shared by all classes).")(fn)
    return click.option("--per-source/--no-per-source", default=None, help="Each source image votes once, with "
                        "its best deformed copy.")(fn)


def run_options(fn):
    """--run and --device, which every command that uses a trained run takes."""
    fn = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)(fn)
    return click.option("--run", "run_dir", required=True, help="Run directory written by `sam-cls train`.")(fn)


def _max_pixels(ctx, param, value) -> None:
    """--max-image-pixels for the command's duration (PIL's limit is global to the process)."""
    from sam_cls.images import max_pixels

    if value is not None:
        before = max_pixels(value)
        ctx.call_on_close(lambda: max_pixels(before))


# For the commands that decode image files: a small file can declare a huge image (a decompression bomb).
max_pixels_option = click.option("--max-image-pixels", type=click.IntRange(min=1), expose_value=False,
                                 callback=_max_pixels, help="Refuse images larger than this many pixels  "
                                 "[default: PIL's Image.MAX_IMAGE_PIXELS, 89478485]")


# For the commands that read a list of image files: answer the readable ones, list the others.
skip_bad_option = click.option("--skip-bad-images", is_flag=True, help="Leave out unreadable image files, each "
                               "listed on stderr, and exit with status 1 when any was left out (else an unreadable "
                               "file is an error, status 2, and nothing is done).")


def list_skipped(skipped: list) -> None:
    """One line a file left out by --skip-bad-images; exit status 1 after the answers, so scripts notice."""
    for _, reason in skipped:
        log(f"skipped: {shown(reason)}")
    if skipped:
        log(f"{len(skipped)} unreadable image file(s) left out (--skip-bad-images)")
        sys.exit(1)


def load(run_dir: str | RunDir, device: str, index: bool = True):
    from sam_cls.classifier import load as load_classifier

    return load_classifier(run_dir, device, log, index)


@main.command()
@run_options
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="Classes shown per image.")
@click.option("--topk", type=click.IntRange(min=0), help="Cells read per image, K (default: the run's read).")
@read_options
@skip_bad_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
@max_pixels_option
@friendly_errors
def predict(run_dir, device, paths, top, topk, balanced, alpha, class_k, per_source, skip_bad_images,
            as_json) -> None:
    """Classify image files (or every image in the folders given), any size or format."""
    from sam_cls.images import image_files

    clf = load(run_dir, device)
    files, skipped = image_files(paths), [] if skip_bad_images else None
    x = clf.images(files, skipped)
    files = [f for f in files if f not in {path for path, _ in skipped or []}]
    proba = clf.predict_proba(x, topk, balanced, torch=True, alpha=alpha, class_k=class_k,
                              per_source=per_source) if files else []
    for path, p in zip(files, proba, strict=True):
        best = p.topk(min(top, len(p)))
        ranked = [{"class": clf.classes[int(c)], "probability": round(float(v), 4)}
                  for v, c in zip(best.values, best.indices, strict=True)]
        if as_json:
            click.echo(json.dumps({"path": str(path), "top": ranked}))
        else:
            click.echo(f"{shown(path)}  " + "  ".join(f"{shown(t['class'])} {t['probability']:.3f}" for t in ranked))
    list_skipped(skipped or [])


@main.command()
@run_options
@click.argument("image", type=click.Path())
@click.option("--neighbours", type=click.IntRange(min=1), default=16, show_default=True,
              help="Nearest cells to list.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write a PNG of the query beside its neighbours.")
@read_options
@click.option("--json", "as_json", is_flag=True)
@max_pixels_option
@friendly_errors
def explain(run_dir, device, image, neighbours, out, balanced, alpha, class_k, per_source, as_json) -> None:
    """The stored examples a prediction rests on: label, similarity, softmax weight and source of each."""
    from sam_cls.run import explain_picture

    clf = load(run_dir, device)
    rows = clf.explain(image, neighbours)
    predicted = clf.classes[int(clf.predict(image, balanced=balanced, alpha=alpha, class_k=class_k,
                                            per_source=per_source)[0])]
    if out:
        explain_picture(clf, image, rows, out, log)
    if as_json:
        click.echo(json.dumps({"path": image, "predicted": predicted, "neighbours": rows}))
        return
    click.echo(f"{shown(image)}: {shown(predicted)}")
    for row in rows:
        click.echo(f"  cell {row['cell']:>7}  {shown(row['label']):<12} similarity {row['similarity']:.3f}  "
                   f"weight {row['weight']:.3f}  {shown(row['source'])}")


@main.command()
@run_options
@click.option("--data", "folder", required=True, type=click.Path(exists=True, file_okay=False),
              help="Image folder laid out as DIR/<class>/*: new or existing class names.")
@skip_bad_option
@click.option("--json", "as_json", is_flag=True)
@max_pixels_option
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="Where the add leaves small classes, refit the metric on the memory's cells (kept only where it "
                   "reads held-out cells better; docs/MEMORY.md).")
@friendly_errors
def add(run_dir, device, folder, skip_bad_images, as_json, refit) -> None:
    """Write labelled images into a run's memory and index with its trained encoder (no training; where small
    classes come in, a metric refit of seconds: docs/MEMORY.md)."""
    from sam_cls.info import refit_text

    skipped = [] if skip_bad_images else None
    with RunDir(run_dir, log).lock() as run:
        clf = load(run, device)
        before, cells = list(clf.classes), clf.memory.size
        added = clf.add_folder(folder, skipped, refit)
        refits = [r["refit"] for r in clf.records if "refit" in r]
        if not added or not clf.save(once=True):  # a retry of an add that committed: it adds nothing twice
            added, clf.classes, refits = 0, before, []
    report({"added": added, "cells": cells + added, "new_classes": clf.classes[len(before):],
            "classes": clf.classes, **({"refit": refit_text(refits[-1]).removeprefix("; ")} if refits else {})}, as_json)
    list_skipped(skipped or [])


@main.command()
@run_options
@click.option("--class", "class_name", help="Forget every cell of this class.")
@click.option("--source", help="Forget the cells whose source matches this glob, e.g. 'mnist train #1??' or '*/cat/*'.")
@click.option("--cells", help="Forget these cells, by number: 3,17,42.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def forget(run_dir, device, class_name, source, cells, as_json) -> None:
    """Remove cells from a run's memory and index: a class, a source, or cell numbers."""
    from sam_cls.config import ConfigError

    try:
        numbers = [int(c) for c in cells.split(",")] if cells else None
    except ValueError:
        raise ConfigError(f"--cells takes cell numbers separated by commas, got {cells!r}") from None
    with RunDir(run_dir, log).lock() as run:
        clf = load(run, device)
        cells = clf.memory.size
        forgotten = clf.forget(class_name, source, numbers)
        if not forgotten:  # nothing matched: the run stays as it is, with no new generation
            log("nothing matched: nothing forgotten, nothing committed")
        elif not clf.save(once=True):  # a retry of a forget that committed: it removes nothing more
            forgotten = 0
    report({"forgotten": forgotten, "cells": cells - forgotten}, as_json)


@main.command()
@run_options
@click.option("--topk", type=click.IntRange(min=0), help="Cells read per test image (default: the run's K).")
@click.option("--data-dir", help="Override the run's data folder.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the confusion matrix as a PNG.")
@read_options
@click.option("--tune", is_flag=True, help="First choose the read (K, temperature, class prior, per-class and "
              "per-source reads) on the run's validation share, or its cells left one out, and store it in the run.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def evaluate(run_dir, device, topk, data_dir, plot, balanced, alpha, class_k, per_source, tune, as_json) -> None:
    """Top-1 and top-5 test accuracy of a run's memory classifier, per class too."""
    from sam_cls.run import evaluate_run, run_data, tune_run

    if tune:
        with RunDir(run_dir, log).lock() as run:
            clf = load(run, device)
            data = run_data(clf, data_dir, log)
            tuned = tune_run(clf, data, log)
            clf.save()
        log(f"stored read: {tuned['tuned']['rule']} (validation accuracy {tuned['tuned']['accuracy']}, as trained "
            f"{tuned['as_trained']['accuracy']})")
    else:
        clf = load(run_dir, device)
        data = run_data(clf, data_dir, log)
    report(evaluate_run(clf, data, topk, plot, balanced, alpha=alpha, class_k=class_k, per_source=per_source),
           as_json)


@main.command("rebuild-index")
@run_options
@index_options
@click.option("--copies", type=click.IntRange(min=1), help="Grow the memory to C cells per training image first "
              "(deformed copies, encoded by the run's encoder; no training).")
@click.option("--copy-kind", type=click.Choice(COPY_KINDS), help="With --copies, on a memory without copies yet: "
              "elastic (digits) or crop-flip (natural images); default: the run's own.")
@click.option("--copy-strength", type=click.FloatRange(min=0, min_open=True), help="With --copies, on a memory "
              "without copies yet: scales the copies' deformation (default: the run's own).")
@click.option("--data-dir", help="Override the run's data folder (for --copies).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def rebuild_index(run_dir, device, copies, copy_kind, copy_strength, data_dir, as_json, **options) -> None:
    """Rebuild a run's index over its memory (any back-end); options not given keep the run's own."""
    from sam_cls.run import expand_memory, rebuild_run_index, run_data
    from sam_cls.setup import index_params

    with RunDir(run_dir, log).lock() as run:
        clf = load(run, device, index=False)  # the saved index may be the reason for the rebuild
        if (copy_kind or copy_strength) and copies is None:
            raise click.UsageError("--copy-kind and --copy-strength go with --copies")
        if copies is not None:
            expand_memory(clf, run_data(clf, data_dir, log), copies, log, copy_kind, copy_strength)
        clf.cfg = make_config(None, **{**clf.cfg.to_dict(), **{k: v for k, v in options.items() if v is not None}})
        report(rebuild_run_index(clf, index_params(clf.cfg, clf.device), log), as_json)


@main.command("index-stats")
@run_options
@click.option("--topk", type=click.IntRange(min=1), help="K for recall@K (default: the run's K).")
@click.option("--queries", type=click.IntRange(min=1), default=1000, show_default=True, help="Test images used as queries.")
@click.option("--data-dir", help="Override the run's data folder.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def index_stats(run_dir, device, topk, queries, data_dir, as_json) -> None:
    """Recall@K and search time of a run's index against exact search."""
    from sam_cls.run import index_stats as stats
    from sam_cls.run import run_data

    clf = load(run_dir, device)
    report(stats(clf, run_data(clf, data_dir, log), topk, queries), as_json)


@main.command()
@run_options
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object on stdout.")
@friendly_errors
def info(run_dir, device, as_json) -> None:
    """What a run is: data set, encoder, classes and their cells, memory and its sources, index, read, history."""
    from sam_cls.info import info_text, run_info

    result = run_info(load(run_dir, device))
    click.echo(json.dumps(result) if as_json else info_text(result))


@main.command()
@click.argument("folder", default=".", type=click.Path(file_okay=False))
@friendly_errors
def examples(folder) -> None:
    """Write the quick start's images into FOLDER: digit0.png, digit1.png, letters/x/ and more-x/."""
    from sam_cls.examples import write_examples

    for path in write_examples(folder):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
