"Multi-process pretraining: 2 CPU processes (gloo) under `accelerate launch`, one run folder, exact resume."
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# accelerate's own launcher module (what `accelerate launch` runs, without its CLI's other imports); `--cpu` would start
# one process without MPI, `--multi_gpu` runs torchrun's N processes, which mgab puts on gloo when there is no GPU
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
TINY = ["--arch", "vit_tiny_patch16_224", "--img-size", "64", "--bs", "2", "--num-workers", "0", "--no-progress"]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def _launch(*argv, timeout=300):
    r = subprocess.run(LAUNCH + ["-m", "mgab.cli.train", *map(str, argv)], capture_output=True, text=True,
                       env=_env(), timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _rows(run): return json.loads((run/"metrics.json").read_text())


def _check_launched_run(run, blr, epochs=2):
    "Item 1: one finished run folder that records 2 processes, the total batch and the lr scaled by it"
    cfg = json.loads((run/"config.json").read_text())
    assert (cfg["world_size"], cfg["bs"], cfg["total_bs"]) == (2, 2, 4)
    assert cfg["lr"] == pytest.approx(blr * 4 / 256, rel=1e-12)  # the total batch, not one process's
    assert json.loads((run/"finished.json").read_text()) == dict(finished=True, epochs=epochs)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == list(range(epochs))
    assert all(r["replicas"] == 2 for r in rows)  # both processes' states were compared after every epoch: equal
    assert not [p.name for p in run.rglob("*") if p.name.startswith(".")]  # no atomic-write leftovers
    return cfg, rows


def _popen(argv):
    return subprocess.Popen(LAUNCH + ["-m", "mgab.cli.train", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)


def _kill_at_first_checkpoint(p, run):
    "SIGKILL a launched run (the launcher and its processes) the moment epoch 0's checkpoint lands"
    try:
        t0 = time.time()
        while not (run/"checkpoints"/"last.pth").exists() and p.poll() is None and time.time() - t0 < 300:
            time.sleep(0.005)
    finally:  # the launcher and every process it started (torchrun gives its workers their own sessions)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            subprocess.run(["pkill", "-9", "-f", f"out {run}( |$)"])
        p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed: the test is invalid"
    assert subprocess.run(["pgrep", "-f", f"out {run}( |$)"], capture_output=True).stdout == b""  # all gone


def test_mae_two_processes_kill_and_exact_resume(tiny_embedded, tmp_path):
    "MAE with bias on 2 processes, killed after epoch 0 and resumed: the same losses as the uninterrupted run"
    data, store = tiny_embedded
    full, killed = tmp_path/"full", tmp_path/"killed"
    args = ["--method", "mae", "--data", data, "--masks", store, *TINY, "--epochs", "2", "--blr", "1e-3"]
    ref = _popen(args + ["--out", full])  # the uninterrupted reference, alongside the run that is killed
    _kill_at_first_checkpoint(_popen(args + ["--out", killed]), killed)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
    cfg, rows = _check_launched_run(full, 1e-3)
    assert cfg["model"]["bias"] == "learnable" and rows[-1]["u_pos_mean"] != 0
    ckpt = torch.load(full/"checkpoints"/"last.pth", weights_only=False)
    ranks = ckpt["rng_ranks"]  # each process's own RNGs: seeds differ by rank (own augmentations, MAE masks)
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert torch.equal(ckpt["rng"]["torch"], ranks[0]["torch"])

    assert torch.load(killed/"checkpoints"/"last.pth", weights_only=False)["epoch"] == 0
    assert not (killed/"finished.json").exists() and len(_rows(killed)) == 1
    r = _launch(*args, "--out", killed, "--resume")
    assert "(resuming)" in r.stdout
    _check_launched_run(killed, 1e-3)
    for a, b in zip(_rows(killed), rows, strict=True):  # epoch 0 is the same run's; epoch 1 was trained twice
        for k in ("train_loss", "lr", "u_pos_mean", "u_neg_mean"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["epoch"], k)
    resumed, whole = (torch.load(r/"encoder.pth") for r in (killed, full))
    assert all(torch.allclose(resumed[k], whole[k], atol=1e-6) for k in whole)


def test_dino_two_processes_and_rank0_eval(tiny_embedded, tmp_path, monkeypatch, capsys):
    "DINO with bias on 2 processes: equal teacher and centre on both (checked each epoch); mgab-eval runs on rank 0"
    data, store = tiny_embedded
    run = tmp_path/"dino"
    _launch("--method", "dino", "--data", data, "--masks", store, *TINY, "--epochs", "2", "--blr", "1e-3",
            "--out-dim", "64", "--n-local", "2", "--local-size", "32", "--out", run)
    _, rows = _check_launched_run(run, 1e-3)
    assert all(r["teacher_entropy"] > 0 for r in rows)
    ckpt = torch.load(run/"checkpoints"/"last.pth", weights_only=False)
    assert ckpt["callbacks"]["DINO"]["center"].abs().sum() > 0 and len(ckpt["rng_ranks"]) == 2

    from mgab.cli.evaluate import eval_main
    argv = ["--run", str(run), "--data", str(data), "--masks", str(store), "--protocol", "knn", "--k", "3",
            "--num-workers", "0"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert eval_main(argv) == 0 and not (run/"results.csv").exists()  # rank 1 leaves the evaluation to rank 0
    monkeypatch.setenv("RANK", "0")
    assert eval_main(argv) == 0
    assert "2 processes launched: rank 0 evaluates alone" in capsys.readouterr().out
    assert len((run/"results.csv").read_text().splitlines()) == 2  # header and one row


@pytest.mark.slow
def test_launched_without_bias_real_kill_and_distill(tiny_embedded, tmp_path):
    "Without bias: MAE (also SIGKILLed after epoch 0 and resumed: same losses) and DINO; mgab-distill; 2 processes each"
    data, store = tiny_embedded
    mae = ["--method", "mae", "--data", data, "--no-bias", *TINY, "--epochs", "2", "--blr", "1e-3"]
    _launch(*mae, "--out", tmp_path/"mae")
    cfg, full = _check_launched_run(tmp_path/"mae", 1e-3)
    assert cfg["model"]["bias"] is None
    killed = tmp_path/"killed"
    _kill_at_first_checkpoint(_popen(mae + ["--out", killed]), killed)  # the launcher and both processes
    assert torch.load(killed/"checkpoints"/"last.pth", weights_only=False)["epoch"] == 0
    assert not (killed/"finished.json").exists()
    _launch(*mae, "--out", killed, "--resume")
    assert [r["train_loss"] for r in _rows(killed)] == pytest.approx([r["train_loss"] for r in full], abs=1e-6)

    _launch("--method", "dino", "--data", data, "--no-bias", *TINY, "--epochs", "2", "--blr", "1e-3", "--out-dim", "64",
            "--n-local", "2", "--local-size", "32", "--out", tmp_path/"dino")
    assert _check_launched_run(tmp_path/"dino", 1e-3)[0]["model"]["bias"] is None
    _launch("--method", "mae", "--data", data, "--masks", store, *TINY, "--epochs", "1", "--blr", "1e-3",
            "--out", tmp_path/"teacher")
    _launch("distill", "--teacher", tmp_path/"teacher", "--epochs", "2", "--bs", "2", "--blr", "1e-3",
            "--num-workers", "0", "--no-progress", "--out", tmp_path/"student")
    cfg, rows = _check_launched_run(tmp_path/"student", 1e-3)
    assert all("attn_gap" in r for r in rows) and (tmp_path/"student"/"distill.json").is_file()
