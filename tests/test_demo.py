"The main job's pipeline: tiny settings produce every artifact; the default run is a slow test."
import json
import pytest
from mgab.demo import main, run_demo


def _check_study(out, method="mae"):
    s = json.loads((out / "summary.json").read_text())
    assert s["stand_in_masks"] is True  # no SAM checkpoint: the labelled stand-in made the masks
    for name in ("vanilla", "biased", "distilled"):
        run = out / f"{method}-{name}"
        assert (run / "encoder.pth").is_file() and (run / "results.csv").is_file(), run
    t1 = (out / "report" / "table1.md").read_text()
    assert "MAE" in t1 or "DINO" in t1
    assert (out / "report" / "table2.md").is_file() and (out / "report" / "fig4.png").stat().st_size > 1000
    return s


def test_demo_tiny_produces_every_artifact_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    s = run_demo(out, epochs=1, distill_epochs=1, depth=2, protocols=("knn",), progress=False)
    _check_study(out)
    printed = capsys.readouterr().out
    assert "STAND-IN" in printed and "| " in printed  # the stand-in is named, the table printed
    rows = (out / "mae-biased" / "results.csv").read_text().splitlines()
    assert len(rows) == 3  # header, with masks, without masks
    # a second run finds everything done: nothing recomputed, same table
    table = (out / "report" / "table1.md").read_text()
    assert main(["--out", str(out), "--epochs", "1", "--distill-epochs", "1", "--depth", "2", "--protocols", "knn",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 3 and (out / "report" / "table1.md").read_text() == table
    assert (out / "mae-biased" / "results.csv").read_text().splitlines() == rows


def test_demo_bad_input(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--data", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "d"), "--masks", str(tmp_path / "nostore"), "--epochs", "1"]) == 1
    assert "nostore" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_default_run(tmp_path):
    "The README's first command, at its default size (minutes on 2 CPU cores)"
    run_demo(tmp_path / "demo", progress=False)
    assert _check_study(tmp_path / "demo")["minutes"] > 0
