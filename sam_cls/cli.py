"""The `sam-cls` command: parse options, call the library, print. No logic lives here."""

import functools
import json
import sys

import click

from sam_cls.config import make_config
from sam_cls.index.params import INDEX_KINDS


def log(message: str) -> None:
    """Progress and logs go to stderr, so stdout stays one clean result (a JSON line with --json)."""
    click.echo(message, err=True)


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
        from sam_cls.config import ConfigError
        from sam_cls.data import DatasetError
        from sam_cls.index import IndexMismatchError
        from sam_cls.train import TrainingError

        try:
            return fn(*args, **kwargs)
        # ValueError too: torch, faiss and the index layer reject impossible values (e.g. nlist > N) with it.
        except (ConfigError, CheckpointError, DatasetError, IndexMismatchError, TrainingError, ImportError,
                ValueError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def index_options(fn):
    """Index choice and knobs, shared by train and rebuild-index."""
    for opt in reversed([
        click.option("--index", type=click.Choice(INDEX_KINDS),
                     help="ANN back-end over the memory (auto chooses by N, d, K and device)."),
        click.option("--nlist", type=click.IntRange(min=1), help="IVF lists (default about 4 sqrt(N))."),
        click.option("--nprobe", type=click.IntRange(min=1), help="IVF lists searched per query."),
        click.option("--pq-m", type=click.IntRange(min=1), help="PQ sub-quantizers for --index ivfpq."),
        click.option("--hnsw-m", type=click.IntRange(min=1), help="HNSW graph degree."),
        click.option("--ef-search", type=click.IntRange(min=1), help="HNSW search breadth (>= K)."),
        click.option("--fp16/--no-fp16", default=None, help="Float16 storage for a GPU index."),
    ]):
        fn = opt(fn)
    return fn


@click.group()
@click.version_option(package_name="sam-cls")
def main() -> None:
    """sam-cls: a classifier that reads the K nearest of all its training examples."""


@main.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML run config; CLI options override it.")
@click.option("--dataset", help="mnist, fashion-mnist, cifar10, cifar100, imagefolder or synthetic.")
@click.option("--data-dir", help="Folder holding the data set (default ./data).")
@click.option("--validation", type=float, help="Hold out this share of train; report accuracy on it, not test.")
@click.option("--encoder", help="linear, conv1 (Conv-MaxPool-ReLU-Linear) or cnn.")
@click.option("--dim", type=int, help="Embedding dimension.")
@click.option("--topk", type=int, help="Cells read per query (K); 0 = dense exact read over all cells.")
@click.option("--temperature", type=float, help="Softmax temperature tau.")
@click.option("--eta", type=float, help="Memory write momentum.")
@click.option("--head", type=click.Choice(["memory", "softmax"]), help="softmax: the parametric baseline.")
@click.option("--support-sample", type=int, help="The seed method: M random support images per batch (no index).")
@click.option("--epochs", type=int)
@click.option("--max-seconds", type=float, help="Wall-clock budget for training steps; the schedule fits it.")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="Peak learning rate (SGD, warm-up then linear decay).")
@index_options
@click.option("--train-nprobe", type=click.IntRange(min=1), help="IVF lists a training read scans (default: ~4K cells).")
@click.option("--rebuild-every", help="Rebuild the index every N steps, 'epoch' or 'auto' (on measured staleness).")
@click.option("--background-rebuild/--no-background-rebuild", default=None, help="Build the next index in a thread.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", type=int)
@click.option("--out", help="Run directory (default runs/<dataset>-<encoder>-k<K>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line on stdout.")
@friendly_errors
def train(config_file, resume, as_json, **options) -> None:
    """Train an encoder and its memory; writes a run directory."""
    from sam_cls.train import train as run_training

    if resume:
        from sam_cls.checkpoint import RunDir
        from sam_cls.config import ConfigError

        if config_file or not options.get("out"):
            raise ConfigError("--resume continues the run in --out RUN_DIR with its own config: give --out, not --config")
        # Options given now (e.g. more --epochs) override the run's own config.
        cfg = RunDir(options["out"]).load_config(**options)
    else:
        cfg = make_config(config_file, **options)
    report(run_training(cfg, resume=resume, log=log), as_json)


@main.command()
@click.option("--run", "run_dir", required=True, help="Run directory written by `sam-cls train`.")
@click.option("--topk", type=click.IntRange(min=0), help="Cells read per test image (default: the run's K).")
@click.option("--data-dir", help="Override the run's data folder.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def evaluate(run_dir, topk, data_dir, device, as_json) -> None:
    """Test accuracy of a run's memory classifier."""
    from sam_cls.run import evaluate_run, load_run

    report(evaluate_run(load_run(run_dir, data_dir, device, log), topk), as_json)


@main.command("rebuild-index")
@click.option("--run", "run_dir", required=True, help="Run directory written by `sam-cls train`.")
@index_options
@click.option("--data-dir", help="Override the run's data folder.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def rebuild_index(run_dir, data_dir, device, as_json, **options) -> None:
    """Re-encode a run's memory and rebuild its index (any back-end)."""
    from sam_cls.run import load_run, rebuild_run_index
    from sam_cls.train import index_params

    loaded = load_run(run_dir, data_dir, device, log)
    cfg = make_config(None, **{**loaded.cfg.to_dict(), **options})
    result = rebuild_run_index(loaded, index_params(cfg, loaded.device), log)
    # Later reads of this run use the back-end and knobs it now has (data_dir stays the run's own).
    loaded.run.save_config(make_config(None, **{**cfg.to_dict(), "data_dir": loaded.run.load_config().data_dir}))
    report(result, as_json)


@main.command("index-stats")
@click.option("--run", "run_dir", required=True, help="Run directory written by `sam-cls train`.")
@click.option("--topk", type=click.IntRange(min=1), help="K for recall@K (default: the run's K).")
@click.option("--queries", type=click.IntRange(min=1), default=1000, show_default=True, help="Test images used as queries.")
@click.option("--data-dir", help="Override the run's data folder.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def index_stats(run_dir, topk, queries, data_dir, device, as_json) -> None:
    """Recall@K and search time of a run's index against exact search."""
    from sam_cls.run import index_stats as stats
    from sam_cls.run import load_run

    report(stats(load_run(run_dir, data_dir, device, log), topk, queries), as_json)


if __name__ == "__main__":
    main()
