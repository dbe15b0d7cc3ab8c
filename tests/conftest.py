"""Fixtures several test modules share."""

import pytest

from sam_cls.config import make_config
from sam_cls.train import train


@pytest.fixture(scope="module")
def mini_linear_run(tmp_path_factory):
    """A 1-epoch linear run on mnist-mini (white digits on black), a few seconds on a CPU; one a module, which
    may change it."""
    out = tmp_path_factory.mktemp("mini") / "run"
    train(make_config(None, encoder="linear", dim=16, topk=16, epochs=1, device="cpu", out=str(out),
                      tune_read=False), log=lambda _: None)
    return out
