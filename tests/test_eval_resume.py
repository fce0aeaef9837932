"""Issue #22, item 3: linear probes and fine-tuning checkpoint every epoch; a killed evaluation resumes to the result
of the uninterrupted one (the same accuracy, the same saved predictions, the same loss in every epoch)."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import IMAGENETTE
from mgab.cli.evaluate import eval_main
from mgab.results import evaluate_run, load_predictions
from mgab.runs import RunFolder, find_runs
from mgab.train import RunCheckpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def eval_lines(argv):
    "`mgab-eval`'s entry function here: exit status, stdout, stderr"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = eval_main([str(a) for a in argv])
        except SystemExit as e: rc = e.code
    return rc, out.getvalue(), err.getvalue()


def kill_when(p: subprocess.Popen, ready, timeout: float = 600.):
    "SIGKILL the process group of `p` the moment `ready()` holds; the test is void if `p` ended first"
    t0 = time.time()
    try:
        while not ready() and p.poll() is None and time.time() - t0 < timeout: time.sleep(0.005)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"mgab-eval ended ({p.returncode}) before it could be killed"


def rows(folder: Path) -> list[dict]: return json.loads((folder/"metrics.json").read_text())


def check_resumed(killed: Path, ref: Path, protocol: str, fraction: float = 1.):
    "The resumed evaluation equals the uninterrupted one: row, saved predictions, every epoch's losses"
    (a,), (b,) = RunFolder(killed).results(), RunFolder(ref).results()
    assert a["value"] == b["value"] and a["predictions"] == b["predictions"]
    pa, pb = (load_predictions(r/a["predictions"]) for r in (killed, ref))
    np.testing.assert_array_equal(pa["pred"], pb["pred"])
    ea, eb = (RunFolder(r).evaluation_dir(protocol, False, fraction) for r in (killed, ref))
    for x, y in zip(rows(ea), rows(eb), strict=True):
        for k in ("train_loss", "valid_loss", "accuracy", "lr"):  # each epoch validated, as fastai's table shows
            assert x[k] == pytest.approx(y[k], abs=1e-6), (x["epoch"], k)
    assert not (ea/"checkpoints").exists() and (ea/"config.json").is_file()  # recorded: the checkpoint is gone


def test_sigkilled_finetune_resumes_to_the_same_result(tiny_eval_run):
    "MAE's full fine-tuning recipe (RandAugment, mixup/CutMix, erasing, drop path): SIGKILL after a checkpoint, resume"
    run, data = tiny_eval_run
    killed, ref = run.parent/"killed", run.parent/"ref"
    shutil.copytree(run, killed); shutil.copytree(run, ref)
    args = ["--data", data, "--protocol", "finetune", "--epochs", "6", "--bs", "4", "--num-workers", "0"]
    ev = RunFolder(killed).evaluation_dir("finetune", False)
    p = subprocess.Popen(["mgab-eval", "--run", str(killed), *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    killer = threading.Thread(target=kill_when, args=(p, (ev/"checkpoints"/"last.pth").exists))
    killer.start()
    rc, out, err = eval_lines(["--run", ref, *args])  # the uninterrupted reference, meanwhile, in this process
    killer.join()
    assert (rc, err) == (0, ""), err
    done = len(rows(ev))
    assert 1 <= done < 6 and not (killed/"results.csv").exists(), done  # killed mid-way: no result recorded
    rc, _, err = eval_lines(["--run", killed, *args])  # without --resume: refused, naming it, nothing changed
    assert rc == 1 and err.count("\n") == 1 and f"holds a partial evaluation ({done} of 6 epochs done): continue it " \
        "with --resume" in err, err
    rc, _, err = eval_lines(["--run", killed, *args, "--bs", "8", "--resume"])  # other settings: refused, named
    assert rc == 1 and "settings differ from the saved run in ['bs', 'total_bs']" in err, err
    rc, out, err = eval_lines(["--run", killed, *args, "--resume"])
    assert (rc, err) == (0, "") and "resuming the evaluation saved in" in out, err
    check_resumed(killed, ref, "finetune")
    assert find_runs(run.parent) == [killed, ref, run]  # an evaluation's folder inside a run is not a run


def test_interrupted_linear_probe_resumes_to_the_same_result(tiny_eval_run, monkeypatch):
    "MAE's linear probe (LARS, augmented crops): stopped right after epoch 1's checkpoint, resumed with resume=None"
    from mgab.data import labelled_dls
    run, data = tiny_eval_run
    ref = run.parent/"ref"
    shutil.copytree(run, ref)
    dls = lambda: labelled_dls(data, img_size=32, patch_size=8, bs=4, augment="linear", num_workers=0)
    kw = dict(epochs=4, progress=False)
    evaluate_run(ref, dls(), "linear", **kw)
    save = RunCheckpoint.after_epoch
    def stop_after_epoch_1(self):
        save(self)
        if self.epoch == 1: raise KeyboardInterrupt  # as a kill: nothing after the checkpoint runs
    with monkeypatch.context() as m:
        m.setattr(RunCheckpoint, "after_epoch", stop_after_epoch_1)
        with pytest.raises(KeyboardInterrupt): evaluate_run(run, dls(), "linear", **kw)
    assert len(rows(RunFolder(run).evaluation_dir("linear", False))) == 2 and not RunFolder(run).results()
    evaluate_run(run, dls(), "linear", **kw)  # resume=None: a partial evaluation with these settings continues
    check_resumed(run, ref, "linear")


@pytest.mark.slow
def test_mae_finetune_100_epochs_on_imagenette_runs_to_the_end_and_resumes(tmp_path):
    """The issue's command (MAE's default recipe, fraction 0.1 of imagenette-mini, 2 loader workers) for 100 epochs
    with a tiny encoder at 64 px, killed at epoch 40 and resumed: the same result as the uninterrupted run"""
    if not IMAGENETTE.is_dir(): pytest.skip(f"real photos not found at {IMAGENETTE}")
    from mgab.train import write_init_run
    from mgab.vit import create_vit
    model = dict(name="vit_tiny_patch16_224", img_size=64, patch_size=16, depth=1, num_classes=0, bias=None)
    run = write_init_run(create_vit(**model), tmp_path/"run", dict(method="mae", model=model))
    killed = tmp_path/"killed"
    shutil.copytree(run, killed)
    args = ["--data", IMAGENETTE, "--protocol", "finetune", "--fraction", "0.1", "--bs", "8", "--num-workers", "2"]
    cmd = lambda r, *more: ["mgab-eval", "--run", str(r), *map(str, args), *more]
    t0 = time.time()
    full = subprocess.Popen(cmd(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    ev = RunFolder(killed).evaluation_dir("finetune", False, 0.1)
    p = subprocess.Popen(cmd(killed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                         start_new_session=True)
    kill_when(p, lambda: (ev/"metrics.json").is_file() and len(rows(ev)) >= 40)
    out, err = full.communicate(timeout=3600)
    print(f"100 epochs in {time.time() - t0:.0f} s")
    assert (full.returncode, err) == (0, ""), err
    assert [r["epoch"] for r in rows(RunFolder(run).evaluation_dir("finetune", False, 0.1))] == list(range(100))
    assert "epoch 100/100: train_loss" in out and "\r" not in out  # a log: plain lines, no bar frames
    r = subprocess.run(cmd(killed, "--resume"), capture_output=True, text=True, env=ENV, timeout=3600)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    check_resumed(killed, run, "finetune", 0.1)
