"""Issue #22, item 4: a terminal keeps fastai's bars; a log (stdout a file or a pipe) gets one plain line per epoch."""
import io
import re
import sys

import pytest

from mgab.core import bars_shown
from mgab.mae import pretrain_mae


class Terminal(io.StringIO):
    "Captured output that says it is a terminal, as a console's stdout does"
    def isatty(self): return True


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from mgab.datasets import make_embedded
    return make_embedded(tmp_path_factory.mktemp("logs")/"data", n_train=1, n_val=1, size=32, progress=False)


def pretrain(out, data, monkeypatch, stdout, progress=True, epochs=3) -> str:
    "Pretrain a tiny MAE for `epochs` with `stdout` as the console; what it printed"
    monkeypatch.setattr(sys, "stdout", stdout)
    pretrain_mae(dict(data=str(data), out=str(out), epochs=epochs, arch="vit_tiny_patch16_224", img_size=32, bs=4,
                      model=dict(depth=1), decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                      num_workers=0, progress=progress))
    monkeypatch.undo()
    return stdout.getvalue()


def test_a_log_gets_one_plain_line_per_epoch(tmp_path, tiny_data, monkeypatch):
    assert not bars_shown(True, io.StringIO())
    out = pretrain(tmp_path/"log", tiny_data, monkeypatch, io.StringIO())
    assert "\r" not in out and "█" not in out, out  # no bar frames
    lines = out.splitlines()
    # epochs of a fraction of a second: the first and the last (a long epoch gets its line every time)
    assert [l.split(":")[0] for l in lines] == ["epoch 1/3", "epoch 3/3"], out
    assert re.fullmatch(r"epoch 3/3: train_loss \d+\.\d{4} \(\d\d:\d\d\)", lines[1]), lines[1]  # no validation
    assert pretrain(tmp_path/"quiet", tiny_data, monkeypatch, io.StringIO(), progress=False) == ""  # --no-progress


def test_a_terminal_keeps_the_bars(tmp_path, tiny_data, monkeypatch):
    assert bars_shown(True, Terminal())
    out = pretrain(tmp_path/"tty", tiny_data, monkeypatch, Terminal(), epochs=1)
    assert "\r" in out and re.search(r"epoch\s+train_loss\s+valid_loss\s+time", out), out  # fastai's bar and table
    assert "epoch 1/1:" not in out  # and no plain lines besides
