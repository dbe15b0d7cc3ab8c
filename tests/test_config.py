"""Options are defined once, on Config's fields: strict coercion, bounds in validate(), generated CLI flags."""

import dataclasses
import math

import pytest
from click.testing import CliRunner

from sam_cls.backbones import torchvision_names
from sam_cls.cli import main
from sam_cls.config import FIELDS, Config, ConfigError, flag, kind, make_config, read_yaml, save_config


def from_yaml(tmp_path, text: str) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return make_config(path)


# ---------------------------------------------------------------- strict types

@pytest.mark.parametrize("text, error", [
    ("topk: 8.9", "--topk must be a whole number, got 8.9"),
    ("topk: true", "--topk must be a whole number, got True"),
    ("topk: eight", "--topk must be a whole number"),
    ("epochs: '2.5'", "--epochs must be a whole number"),
    ("augment: maybe", "--augment must be true or false"),
    ("fp16: 1", "--fp16 must be true or false"),  # only real booleans, or the words: not a YAML number
    ("temperature: .inf", "--temperature must be a finite number"),
    ("eta: .nan", "--eta must be a finite number"),
    ("lr: -.inf", "--lr must be a finite number"),
    ("temperature: hot", "--temperature must be a number"),
    ("temperature: false", "--temperature must be a number"),
    ("dataset: 3", "--dataset must be text"),
    ("dim: null", "--dim needs a value"),
    ("synthetic_shape: [1, 8.5, 8]", "--synthetic-shape must be a whole number"),
])
def test_yaml_values_of_the_wrong_type_are_refused(tmp_path, text, error):
    with pytest.raises(ConfigError, match="^" + error.replace(".", r"\.").replace("[", r"\[")):
        from_yaml(tmp_path, text)


def test_yaml_values_are_coerced_exactly(tmp_path):
    cfg = from_yaml(tmp_path, "topk: '5'\ndim: 64.0\nfp16: 'false'\naugment: 'OFF'\nbackground_rebuild: 'Yes'\n"
                              "temperature: '0.1'\nmax_seconds: 30\nrebuild_every: 100\nsynthetic_shape: 3x4x5\n")
    assert (cfg.topk, cfg.dim) == (5, 64) and type(cfg.topk) is int and type(cfg.dim) is int
    assert cfg.fp16 is False and cfg.augment is False and cfg.background_rebuild is True
    assert cfg.temperature == 0.1 and cfg.max_seconds == 30.0 and type(cfg.max_seconds) is float
    assert cfg.rebuild_every == "100" and cfg.synthetic_shape == [3, 4, 5]
    assert from_yaml(tmp_path, "rebuild_every: Epoch").rebuild_every == "epoch"


@pytest.mark.parametrize("name", [n for n in FIELDS if kind(n)[0] is float])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "NaN"])
def test_every_float_option_refuses_non_finite_values(name, value):
    with pytest.raises(ConfigError, match=f"^--{flag(name)} must be a finite number"):
        make_config(None, **{name: value})


@pytest.mark.parametrize("text, value", [("true", True), ("FALSE", False), ("yes", True), ("No", False),
                                         ("on", True), ("off", False), ("1", True), ("0", False)])
def test_boolean_words(text, value):
    assert make_config(None, fp16=text).fp16 is value


# ---------------------------------------------------------------- bounds, in validate() only

def _outside_and_inside(meta, integer: bool):
    """A value just past each bound, and one just inside it."""
    step = 1 if integer else 0.001
    for bound, outside, inside in (("ge", -step, 0), ("gt", 0, step), ("le", step, 0), ("lt", 0, -step)):
        if meta[bound] is not None:
            yield bound, meta[bound] + outside, meta[bound] + inside


BOUNDED = [(name, *case) for name, f in FIELDS.items()
           for case in _outside_and_inside(f.metadata, kind(name)[0] is int)]


@pytest.mark.parametrize("name, bound, outside, inside", BOUNDED)
def test_each_bound_is_checked_and_named(name, bound, outside, inside):
    with pytest.raises(ConfigError, match=f"^--{flag(name)} must be .*, got {outside}"):
        make_config(None, **{name: outside})
    assert getattr(make_config(None, **{name: inside}), name) == inside


def test_bounds_cover_the_options_that_need_them():
    assert {"topk", "dim", "epochs", "batch_size", "lr", "eta", "temperature", "validation", "seed", "nlist",
            "nprobe", "train_nprobe", "max_seconds", "eval_batch_size"} <= {name for name, *_ in BOUNDED}


@pytest.mark.parametrize("options, error", [
    ({"support_sample": 1}, "--support-sample must be 0 (off) or at least 2"),
    ({"rebuild_every": "0"}, "--rebuild-every must be a positive number"),
    ({"rebuild_every": "weekly"}, "--rebuild-every must be a positive number"),
    ({"synthetic_shape": [1, 8]}, "--synthetic-shape must be three positive sizes"),
    ({"head": "knn"}, "--head must be one of memory, softmax; got 'knn'"),
    ({"device": "tpu"}, "--device must be one of auto, cpu, cuda; got 'tpu'"),
    ({"index": "annoy"}, "--index must be one of auto, flat"),
])
def test_special_checks(options, error):
    with pytest.raises(ConfigError, match="^" + error.replace("(", r"\(").replace(")", r"\)")):
        make_config(None, **options)


def test_validate_only_checks():
    cfg = Config(topk=-1)  # constructing does not check bounds ...
    before = cfg.to_dict()
    with pytest.raises(ConfigError, match="--topk must be >= 0, got -1"):
        cfg.validate()  # ... validate does, and changes nothing
    good = Config(head="softmax")
    snapshot = dataclasses.asdict(good)
    assert good.validate() is good and dataclasses.asdict(good) == snapshot
    assert before == cfg.to_dict()


def test_derived_values_are_filled_at_construction():
    assert Config().lr == 1.0 and Config(head="softmax").lr == 0.01 and Config(head="softmax", lr=0.3).lr == 0.3
    assert make_config(None, head="softmax").lr == 0.01
    assert Config(rebuild_every=25).rebuild_every == "25"


def test_precedence_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: synthetic\nepochs: 3\nbatch-size: 64\n")
    cfg = make_config(path, epochs=None, topk="8")  # None: an option not given on the command line
    assert (cfg.dataset, cfg.epochs, cfg.batch_size, cfg.topk, cfg.dim) == ("synthetic", 3, 64, 8, 128)
    assert make_config(path, epochs=1).epochs == 1
    save_config(cfg, tmp_path / "saved.yaml")
    assert make_config(tmp_path / "saved.yaml") == cfg == make_config(None, **cfg.to_dict())
    assert set(read_yaml(tmp_path / "saved.yaml")) == set(FIELDS)


# ---------------------------------------------------------------- the generated flags

def help_text(*command: str) -> str:
    # Wide, so no help line wraps and each option's text can be checked on its own line.
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=400, max_content_width=400)
    assert result.exit_code == 0, result.output
    return result.output


def option_line(text: str, opt: str) -> str:
    """An option's entry in --help: its line, and the next one where a long metavar pushed the help there."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(opt + " ") or line.strip() == opt)
    more = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].strip().startswith("-") else ""
    return " ".join((lines[i] + " " + more).split())


def test_train_help_has_every_field_with_help_and_default():
    text = help_text("train")
    for name, f in FIELDS.items():
        opt = f"--{flag(name)}" + (f" / --no-{flag(name)}" if kind(name)[0] is bool else "")
        line = option_line(text, opt)
        assert "[default: " in line and len(line.split("[default: ")[0]) > len(opt) + 12, line  # some help text
        if f.metadata["choices"]:
            assert "[" + "|".join(f.metadata["choices"]) + "]" in line, line
    assert "[default: mnist-mini]" in option_line(text, "--dataset")
    assert "[linear|conv1|cnn]" in option_line(text, "--encoder")
    assert "[memory|softmax]" in option_line(text, "--head")
    assert "[auto|cpu|cuda]" in option_line(text, "--device")
    assert "[auto|flat|ivf|ivfpq|hnsw|torch]" in option_line(text, "--index")
    assert "[default: 10; x>=0]" in option_line(text, "--epochs")
    assert "[default: 128; x>=1]" in option_line(text, "--batch-size")
    assert "[default: 0; x>=0]" in option_line(text, "--seed")
    assert "[default: 0.5; 0<=x<1]" in option_line(text, "--eta")
    assert "1.0 with --head memory, 0.01 with --head softmax" in option_line(text, "--lr")
    assert "[default: no-fp16]" in option_line(text, "--fp16 / --no-fp16")
    for opt in ("--config", "--resume", "--json"):
        option_line(text, opt)


def test_rebuild_index_shares_the_index_flags():
    text = help_text("rebuild-index")
    assert "[default: auto]" in option_line(text, "--index")
    assert "x>=1" in option_line(text, "--nlist")
    assert "--topk" not in text


def test_cli_values_meet_the_same_rules_in_one_line(tmp_path):
    for args, error in ((["--topk", "8.9"], "error: --topk must be a whole number, got '8.9'"),
                        (["--topk", "-1"], "error: --topk must be >= 0, got -1"),
                        (["--temperature", "inf"], "error: --temperature must be a finite number, got 'inf'"),
                        (["--epochs", "-1"], "error: --epochs must be >= 0, got -1"),
                        (["--encoder", "vit"], ("error: --encoder must be one of linear, conv1, cnn or a torchvision "
                         f"classification model ({', '.join(torchvision_names())}); got 'vit'"))):
        result = CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path / "never")])
        assert result.exit_code == 2 and result.stderr.strip() == error, result.output
    assert not (tmp_path / "never").exists()


def test_unset_flags_leave_the_config_file_alone(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: synthetic\nsynthetic_train: 200\nsynthetic_test: 50\nsynthetic_shape: [1, 4, 4]\n"
                    "encoder: linear\ndim: 8\ntopk: 8\nepochs: 3\nbatch_size: 50\ndevice: cpu\n"
                    "augment: 'off'\nbackground_rebuild: 'no'\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--epochs", "1", "--topk", "4",
                                       "--synthetic-shape", "1,3,3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = read_yaml(out / "config.yaml")
    assert saved["epochs"] == 1 and saved["topk"] == 4 and saved["synthetic_shape"] == [1, 3, 3]  # CLI wins
    assert saved["augment"] is False and saved["batch_size"] == 50 and saved["dim"] == 8  # the file's, kept
    assert saved["lr"] == 1.0 and saved["temperature"] == 0.05  # defaults fill the rest
