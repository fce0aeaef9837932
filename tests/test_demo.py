"The main job's pipeline: tiny settings produce every artifact; the default run is a slow test."
import csv
import json
import subprocess

import numpy as np
import pytest
from mgab.demo import main, run_demo
from mgab.runs import RunFolder

VARIANTS = ("random", "vanilla", "biased", "distilled")


def _check_study(out, method="mae", seeds=(0,)):
    s = json.loads((out / "summary.json").read_text())
    assert s["stand_in_masks"] is True  # no SAM checkpoint: a labelled stand-in made the masks
    for seed in seeds:
        for name in VARIANTS:
            run = out / (f"{method}-{name}" if seed == seeds[0] else f"{method}-{name}-seed{seed}")
            assert (run / "encoder.pth").is_file() and (run / "results.csv").is_file(), run
    floor = json.loads((out / f"{method}-random" / "config.json").read_text())
    assert floor["epochs"] == 0 and floor["init"] == "random" and floor["model"]["bias"] is None
    t1 = (out / "report" / "table1.md").read_text().splitlines()
    rows = [r for r in t1 if r.startswith("| ") and "---" not in r][1:]  # the header row dropped
    assert rows[0].startswith(f"| {method.upper()} (random init) |")  # the floor comes first
    assert any(r.startswith(f"| {method.upper()} + our method (distilled)") for r in rows)
    report = out / "report"
    for f in ("table2.md", "fig4.png", "attention.png"): assert (report / f).stat().st_size > 100, f
    return s, rows


def test_demo_tiny_produces_every_artifact_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    s = run_demo(out, epochs=1, distill_epochs=1, depth=2, protocols=("knn",), seeds=2, progress=False)
    s, rows = _check_study(out, seeds=(0, 1))
    printed = capsys.readouterr().out
    assert "STAND-IN" in printed and "mean coverage" in printed and "70.4-72.7%" in printed
    assert all("±" in r for r in rows)  # two seeds: mean ± std in every row
    def knn(variant, masks):  # each seed's kNN value in its results.csv
        seeds = [csv.DictReader((out / f"mae-{variant}{sfx}" / "results.csv").read_text().splitlines())
                 for sfx in ("", "-seed1")]
        return np.array([next(float(r["value"]) for r in rs if r["protocol"] == "knn" and r["with_masks"] == str(masks))
                         for rs in seeds])
    ours, base = knn("biased", True), knn("vanilla", False)
    cells = {r.split("|")[1].strip(): r.split("|")[-2].strip() for r in rows}  # method: its kNN cell
    assert cells["MAE + our method"].startswith(  # the seeds' mean ± std, and the difference carrying its interval
        f"{ours.mean():.1f} ± {ours.std(ddof=1):.1f} ({ours.mean() - base.mean():+.1f} ["), cells
    # the random-init floor is the encoder the vanilla run started from: the trained one moved away from it
    floor, trained = (RunFolder(out / f"mae-{v}").load_encoder().state_dict() for v in ("random", "vanilla"))
    assert any(not np.allclose(floor[k], trained[k]) for k in floor)
    with open(out / "mae-biased" / "results.csv") as f: res = list(csv.DictReader(f))
    assert sorted(r["with_masks"] for r in res) == ["False", "True"]
    # a second run finds everything done: nothing recomputed, same table
    table = (out / "report" / "table1.md").read_text()
    assert main(["--out", str(out), "--epochs", "1", "--distill-epochs", "1", "--depth", "2", "--protocols", "knn",
                 "--seeds", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 8 and (out / "report" / "table1.md").read_text() == table
    with open(out / "mae-biased" / "results.csv") as f: assert list(csv.DictReader(f)) == res


def test_demo_bad_input(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--data", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "d").exists()  # nothing left behind
    assert main(["--out", str(tmp_path / "d"), "--masks", str(tmp_path / "nostore"), "--epochs", "1"]) == 1
    assert "nostore" in capsys.readouterr().err


@pytest.mark.parametrize("args, word", [(["--epochs", "0"], "--epochs"), (["--seeds", "0"], "--seeds"),
                                        (["--lr", "-1"], "--lr"), (["--protocols", "linear,probe"], "probe")])
def test_demo_usage_errors_through_the_entry_point(tmp_path, args, word):
    r = subprocess.run(["mgab-demo", "--out", str(tmp_path / "d")] + args, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and word in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_default_run(tmp_path):
    "The README's first command, at its default size (8 min on 2 CPU cores): MAE learns, the bias learns Fig. 4's sign"
    s, rows = _check_study(run_demo(tmp_path / "demo", progress=False) and tmp_path / "demo")
    linear = {r.split("|")[1].strip(): float(r.split("|")[4].split()[0]) for r in rows}
    assert linear["MAE"] >= linear["MAE (random init)"] + 10, linear  # README: 56.3 against 44.7
    reach = s["bias_reach"]["mae-biased"]
    assert all(p > 0 > n for p, n in zip(reach["u_pos"], reach["u_neg"])), reach  # u_pos > 0 > u_neg in every layer
    gap = json.loads((tmp_path / "demo" / "mae-distilled" / "distill.json").read_text())
    assert gap["student_init"] == "scratch", gap
    assert gap["attn_gap_after"] <= 0.5 * gap["attn_gap_before"], gap  # README: 0.379 -> 0.088


@pytest.mark.slow
def test_demo_on_a_photo_folder(tmp_path, imagenette):
    "`--data FOLDER`: the same study on real photos, masks from the calibrated superpixel stand-in, said so (~90 s)"
    r = subprocess.run(["mgab-demo", "--data", str(imagenette), "--out", str(tmp_path / "d"), "--epochs", "1",
                        "--distill-epochs", "1", "--depth", "2", "--protocols", "knn", "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SUPERPIXEL STAND-IN" in r.stdout and "SAM ViT-H in the paper: 70.4-72.7%" in r.stdout
    cov = float(r.stdout.split("mean coverage ")[1].split("%")[0])
    assert 60 <= cov <= 85, cov  # calibrated to SAM's coverage
    assert (tmp_path / "d" / "report" / "table1.md").read_text().count("| MAE") == 5
