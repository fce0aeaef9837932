"mgab-eval and mgab-report on hand-made run folders, with stand-in loaders and with mgab.data's own."
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders

from mgab.cli.evaluate import eval_cli, eval_main, report_cli, report_main
from mgab.results import evaluate_run, load_predictions
from mgab.runs import RESULT_COLUMNS, RunFolder
from mgab.vit import create_vit

ARCH, DEPTH = "vit_tiny_patch16_224", 4
ROOT = Path(__file__).resolve().parents[1]


class Items(torch.utils.data.Dataset):
    "`(x, m, y)` items as mgab.data.labelled_dls yields them (contract 3)"
    n_inp, vocab = 2, ["a", "b", "c"]

    def __init__(self, n, seed, img_size=32):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 3, img_size, img_size, generator=g) + 3 * F.one_hot(self.y, 3).float()[:, :, None, None]
        self.m = torch.randint(0, 6, (n, (img_size // 16) ** 2), generator=g)

    def __len__(self): return len(self.y)
    def __getitem__(self, i): return self.x[i], self.m[i], self.y[i]


def tiny_dls(has_masks=True, img_size=32):
    dls = DataLoaders.from_dsets(Items(24, 0, img_size), Items(12, 1, img_size), bs=8, device="cpu", num_workers=0)
    dls.has_masks = has_masks
    return dls


def make_run(d, bias="learnable", method="mae", epochs=2):
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    enc = create_vit(ARCH, img_size=32, num_classes=0, depth=DEPTH, bias=bias)
    if bias == "learnable":
        with torch.no_grad():
            for blk in enc.blocks: blk.attn.u_pos.fill_(2.); blk.attn.u_neg.fill_(-1.)
    torch.save(enc.state_dict(), d/"encoder.pth")
    (d/"config.json").write_text(json.dumps(dict(method=method, epochs=epochs, data="data", masks="store",
                                                 model=dict(name=ARCH, img_size=32, depth=DEPTH, bias=bias))))
    return d


def exits_with(argv_fn, contains, capsys):
    "The command stops with exit status 2 and a one-line message on stderr"
    capsys.readouterr()
    rc = argv_fn()
    err = capsys.readouterr().err
    assert rc == 2 and contains in err and err.count("\n") == 1, err


def test_evaluate_run_all_protocols_append_rows(tmp_path):
    run = make_run(tmp_path/"run")
    dls = tiny_dls()
    knn = evaluate_run(run, dls, "knn", progress=False)
    knn_nm = evaluate_run(run, dls, "knn", with_masks=False, progress=False)
    lin = evaluate_run(run, dls, "linear", epochs=2, precompute=True, progress=False)
    ft = evaluate_run(run, dls, "finetune", fraction=0.5, epochs=1, progress=False)
    assert (run/"results.csv").read_text().splitlines()[0] == ",".join(RESULT_COLUMNS)
    rows = RunFolder(run).results()
    assert [(r["protocol"], r["fraction"], r["with_masks"]) for r in rows] == [
        ("knn", 1.0, True), ("knn", 1.0, False), ("linear", 1.0, True), ("finetune", 0.5, True)]
    assert all(r["metric"] == "top1" and r["arch"] == ARCH and r["method"] == "mae" and r["epochs"] == "2"
               and r["timestamp"] for r in rows)
    for row, r in zip((knn, knn_nm, lin, ft), rows):  # each value is the share of saved outcomes that are right
        p = load_predictions(run/r["predictions"])
        np.testing.assert_array_equal(p["label"], dls.valid.dataset.y.numpy())
        assert r["value"] == row["value"] == pytest.approx(100 * p["correct"].mean(), abs=1e-3)
    # seeded (evaluate_run seeds the head and the shuffling), measured: colour-shifted classes are easy for kNN and
    # fine-tuning even from a random encoder; two LARS epochs at MAE's tiny linear lr leave the probe below chance
    assert [row["value"] for row in (knn, knn_nm, lin, ft)] == pytest.approx([100., 100., 100 / 12, 100.], abs=1e-3)
    lin_pred = load_predictions(run/lin["predictions"])["pred"]
    np.testing.assert_array_equal(lin_pred, [2, 0, 2, 2, 0, 1, 2, 0, 1, 2, 2, 1])


def test_evaluate_run_masks_setting_recorded_truthfully(tmp_path):
    vanilla = make_run(tmp_path/"vanilla", bias=None)
    assert evaluate_run(vanilla, tiny_dls(), "knn", progress=False)["with_masks"] is False  # no bias: masks unused
    biased = make_run(tmp_path/"biased")
    assert evaluate_run(biased, tiny_dls(has_masks=False), "knn", progress=False)["with_masks"] is False
    row = evaluate_run(biased, tiny_dls(), "knn", save=False, progress=False)
    assert row["with_masks"] is True and len(RunFolder(biased).results()) == 1


def test_eval_main_errors_before_data(tmp_path, capsys):
    run = make_run(tmp_path/"run")
    exits_with(lambda: eval_main(["--run", str(tmp_path/"missing"), "--protocol", "knn"]), "config.json", capsys)
    (tmp_path/"noenc").mkdir(); (tmp_path/"noenc"/"config.json").write_text((run/"config.json").read_text())
    exits_with(lambda: eval_main(["--run", str(tmp_path/"noenc"), "--protocol", "knn"]), "encoder.pth", capsys)
    exits_with(lambda: eval_main(["--run", str(run), "--protocol", "knn"]), "--masks STORE", capsys)
    exits_with(lambda: eval_main(["--run", str(run), "--protocol", "knn", "--masks", str(tmp_path/"x")]),
               "does not exist", capsys)
    exits_with(lambda: eval_main(["--run", str(run), "--protocol", "linear", "--fraction", "2"]), "(0, 1]", capsys)
    exits_with(lambda: eval_main(["--run", str(run), "--protocol", "knn", "--student"]),
               "has no student.pth: --student evaluates the student of a DINO run (this run's method: mae)", capsys)
    exits_with(lambda: eval_main(["--run", str(run), "--protocol", "svm"]), "invalid choice: 'svm'", capsys)


def test_eval_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mgab-eval", "--help"])  # the console script calls eval_main()
    with pytest.raises(SystemExit) as e: eval_main()
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--protocol {linear,knn,finetune}" in out and "--no-masks" in out
    assert "--student" in out and "the student of a DINO run" in out


def test_report_main(tmp_path, capsys):
    base, ours = make_run(tmp_path/"runs"/"a_base", bias=None), make_run(tmp_path/"runs"/"b_ours")
    dls = tiny_dls()
    b = evaluate_run(base, dls, "knn", progress=False)
    o = evaluate_run(ours, dls, "knn", progress=False)
    written = report_cli([str(tmp_path/"runs"), "--out", str(tmp_path/"rep")])  # a folder of runs
    assert sorted(written) == ["fig4.png", "table1.csv", "table1.md"]
    out = capsys.readouterr().out
    cell = f"{o['value']:.1f} ({o['value'] - b['value']:+.1f} ["  # then the bootstrap interval
    assert f"| MAE + our method | ViT-Ti/16 | 2 | - | - | - | - | {cell}" in out
    with open(written["table1.csv"], newline="") as fh: rows = list(csv.DictReader(fh))
    assert [r["Method"] for r in rows] == ["MAE", "MAE + our method"]
    assert float(rows[1]["kNN diff"]) == pytest.approx(o["value"] - b["value"], abs=1e-3)
    exits_with(lambda: report_main([str(tmp_path/"nothing")]), "nothing' does not exist", capsys)


# ---------------------------------------------------------------- the installed commands, as a user runs them
def entry(*argv):
    "Run an installed console script on this checkout's code"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=300)


def colour_folder(root, n=6):
    "An ImageFolder (train/, val/) of `n` noisy red (class a) and blue (class b) 32x32 images per split"
    from PIL import Image
    import numpy as np
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, colour in enumerate(((220, 40, 40), (40, 40, 220))):
            (root/split/"ab"[c]).mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + g.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root/split/"ab"[c]/f"{i}.png")
    return root


def last_row(stdout):
    lines = stdout.splitlines()
    assert lines[-2] == ",".join(RESULT_COLUMNS), stdout
    return dict(zip(RESULT_COLUMNS, lines[-1].split(",")))


def test_mgab_eval_student_entry_point(tmp_path, capsys):
    "--student evaluates student.pth (recorded as encoder=student), exit 0, stderr empty; without student.pth, exit 2"
    data = colour_folder(tmp_path/"data")
    run = make_run(tmp_path/"run", bias=None, method="dino")
    zero = {k: torch.zeros_like(v) for k, v in torch.load(run/"encoder.pth", weights_only=True).items()}
    torch.save(zero, run/"student.pth")  # a collapsed student: all features equal, kNN at chance
    common = ["--run", run, "--data", data, "--protocol", "knn", "--bs", "8", "--no-progress"]
    r = entry("mgab-eval", *common, "--student")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    student = last_row(r.stdout)
    assert (float(student["value"]), student["encoder"]) == (50.0, "student")
    teacher = eval_cli([str(a) for a in common])  # encoder.pth, in this process
    assert teacher["value"] > 90 and teacher["encoder"] == "encoder"
    assert [(x["encoder"], x["value"]) for x in RunFolder(run).results()] == [("student", 50.0), ("encoder", teacher["value"])]
    (run/"student.pth").unlink()
    r = entry("mgab-eval", *common, "--student")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"mgab-eval: error: run {str(run)!r} has no student.pth: --student evaluates")


def test_mgab_report_entry_point(tmp_path):
    run = make_run(tmp_path/"run")
    evaluate_run(run, tiny_dls(), "knn", progress=False)
    r = entry("mgab-report", run, "--out", tmp_path/"rep")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert "| MAE + our method | ViT-Ti/16 | 2 |" in r.stdout and (tmp_path/"rep"/"fig4.png").stat().st_size > 1000


# ---------------------------------------------------------------- the loaders mgab-eval asks mgab.data for
@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    "Stand-ins for mgab.data, mgab.datasets and mgab.store that record how mgab-eval calls them (contracts 2 and 3)"
    import types
    import mgab
    calls = []
    root = tmp_path/"imgs"
    for split in ("train", "val"): (root/split).mkdir(parents=True)

    def labelled_dls(path, masks=None, img_size=224, patch_size=16, bs=64, augment="finetune", fraction=None,
                     subset_file=None, seed=0, **kwargs):
        calls.append(dict(path=path, masks=masks, img_size=img_size, patch_size=patch_size, bs=bs, augment=augment,
                          fraction=fraction, subset_file=subset_file, seed=seed))
        return tiny_dls(has_masks=masks is not None, img_size=img_size)

    class MaskStore:
        def __init__(self, root): self.root = root

    data = types.SimpleNamespace(labelled_dls=labelled_dls)
    datasets = types.SimpleNamespace(resolve_data=lambda spec: root if spec == "embedded" else Path(spec))
    store = types.SimpleNamespace(MaskStore=MaskStore)
    for name, mod in (("data", data), ("datasets", datasets), ("store", store)):
        monkeypatch.setitem(sys.modules, f"mgab.{name}", mod)
        monkeypatch.setattr(mgab, name, mod, raising=False)
    import mgab.cli.evaluate as cli  # the command imports the loaders itself: their defaults show in its --help
    monkeypatch.setattr(cli, "labelled_dls", labelled_dls)
    return calls, root


def test_eval_main_calls_the_loaders_per_protocol(tmp_path, fake_data, capsys):
    calls, root = fake_data
    run = make_run(tmp_path/"run")
    (tmp_path/"store").mkdir()
    knn = eval_cli(["--run", str(run), "--masks", str(tmp_path/"store"), "--protocol", "knn", "--bs", "8",
                     "--no-progress"])
    assert calls[-1]["path"] == root and calls[-1]["masks"].root == str(tmp_path/"store")
    c = calls[-1]
    assert (c["augment"], c["img_size"], c["patch_size"], c["bs"]) == ("none", 32, 16, 8)  # img_size from config
    assert knn["with_masks"] is True
    lin = eval_cli(["--run", str(run), "--data", str(root), "--no-masks", "--protocol", "linear", "--augment", "none",
                     "--epochs", "1", "--bs", "8", "--no-progress"])
    assert calls[-1]["masks"] is None and calls[-1]["augment"] == "none" and lin["with_masks"] is False
    ft = eval_cli(["--run", str(run), "--no-masks", "--protocol", "finetune", "--fraction", "0.1", "--seed", "3",
                    "--epochs", "1", "--img-size", "48", "--bs", "8", "--no-progress", "--aa", "none"])  # tensors
    assert (calls[-1]["augment"], calls[-1]["fraction"], calls[-1]["seed"], calls[-1]["img_size"]) == (
        "finetune", 0.1, 3, 48)
    assert ft["fraction"] == 0.1
    assert [(r["protocol"], r["fraction"], r["with_masks"]) for r in RunFolder(run).results()] == [
        ("knn", 1.0, True), ("linear", 1.0, False), ("finetune", 0.1, False)]
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == ",".join(RESULT_COLUMNS) and out[-1].startswith("finetune,0.1,False,top1,")


# ---------------------------------------------------------------- end to end, with mgab.data (and mgab.masks)
def test_eval_main_embedded_no_masks(tmp_path, embedded_store, capsys):
    embedded = embedded_store[0]
    run = make_run(tmp_path/"run")
    common = ["--run", str(run), "--data", str(embedded), "--img-size", "32", "--bs", "16", "--no-progress"]
    knn = eval_cli(common + ["--no-masks", "--protocol", "knn"])
    lin = eval_cli(common + ["--no-masks", "--protocol", "linear", "--augment", "none", "--epochs", "2"])
    assert knn["with_masks"] is False and lin["with_masks"] is False
    # regression pins, seeded and measured on the merged #21/#22/#23 code: the embedded data v3 (1000 validation
    # images of 10 classes), a random encoder at 32 px: kNN 303 right, the 2-epoch linear probe 143
    assert (knn["value"], lin["value"]) == pytest.approx((30.3, 14.3), abs=1e-3)
    out = capsys.readouterr().out.splitlines()
    assert ",".join(RESULT_COLUMNS) in out and out[-1].startswith("linear,1.0,False,top1,")
    assert [r["protocol"] for r in RunFolder(run).results()] == ["knn", "linear"]


def test_eval_main_embedded_with_masks(tmp_path, embedded_store):
    embedded, store = embedded_store  # its masks: SuperpixelMasker("slic", c=5)
    run = make_run(tmp_path/"run")
    row = eval_cli(["--run", str(run), "--data", str(embedded), "--masks", str(store), "--protocol", "knn",
                     "--img-size", "32", "--bs", "16", "--no-progress"])
    # a regression pin, seeded and measured as above: with the masks at 2x2 tokens kNN gets 305 of the 1000 right
    # (303 without)
    assert row["with_masks"] is True and row["value"] == pytest.approx(30.5, abs=1e-3)


def test_eval_main_recipes_flags_and_subset_file(tmp_path, fake_data, capsys, monkeypatch):
    "--recipe dino reaches the linear probe and the row; MAE's fine-tuning flags reach fine_tune; a subset file"
    import mgab.results as ev  # evaluate_run calls fine_tune from its own module
    calls, root = fake_data
    run = make_run(tmp_path/"run")
    (tmp_path/"store").mkdir()
    common = ["--run", str(run), "--epochs", "1", "--bs", "8", "--no-progress"]
    lin = eval_cli(common + ["--no-masks", "--protocol", "linear", "--recipe", "dino", "--augment", "none",
                             "--n-last-blocks", "2"])
    assert lin["recipe"] == "dino" and RunFolder(run).results()[-1]["recipe"] == "dino"
    seen = {}
    def fake_fine_tune(encoder, dls, **kw):
        seen.update(kw)
        raise SystemExit(0)
    with monkeypatch.context() as mp, pytest.raises(SystemExit):
        mp.setattr(ev, "fine_tune", fake_fine_tune)
        eval_cli(common + ["--no-masks", "--protocol", "finetune", "--mixup", "0.5", "--reprob", "0.1",
                           "--layer-decay", "0.65", "--warmup-epochs", "2", "--aa", "none"])
    assert (seen["mixup"], seen["cutmix"], seen["reprob"], seen["aa"], seen["layer_decay"]) == (0.5, None, 0.1,
                                                                                              "none", 0.65)
    assert (seen["warmup_pct"], seen["label_smoothing"], seen["drop_path"], seen["mixup_mode"]) == (2., 0.1, 0.1,
                                                                                                    "batch")
    (tmp_path/"subset.txt").write_text("a_1.png\nb_2.png\n")
    sub = eval_cli(common + ["--no-masks", "--protocol", "knn", "--fraction", "0.01", "--subset-file",
                             str(tmp_path/"subset.txt")])
    assert (calls[-1]["subset_file"], calls[-1]["fraction"], sub["fraction"]) == (str(tmp_path/"subset.txt"), None,
                                                                                  0.01)
    masked = common + ["--masks", str(tmp_path/"store"), "--protocol", "finetune"]
    exits_with(lambda: eval_main(masked + ["--mixup", "0.8"]), "mixup (--mixup 0.8) mixes two images", capsys)
    exits_with(lambda: eval_main(masked + ["--aa", "rand-m9-mstd0.5-inc1"]), "Pass --aa none", capsys)
    exits_with(lambda: eval_main(common + ["--no-masks", "--protocol", "knn", "--recipe", "mae"]),
               "--protocol knn has the recipes dino", capsys)


def test_mgab_eval_refuses_pixel_moving_augmentations_with_masks(tmp_path):
    "The installed command exits 2 with one line naming the flag, before reading any data"
    run = make_run(tmp_path/"run")
    (tmp_path/"store").mkdir()
    (tmp_path/"store"/"info.json").write_text(json.dumps(dict(image_dir=str(tmp_path))))  # a store header only
    r = entry("mgab-eval", "--run", run, "--masks", tmp_path/"store", "--protocol", "finetune", "--reprob", "0.25",
              "--data", tmp_path/"nowhere")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("mgab-eval: error: random erasing (--reprob 0.25) replaces pixels") and \
        "Pass --reprob 0 (`reprob=0.0`), or --no-masks" in r.stderr


def test_eval_main_subset_file_on_real_loaders(tmp_path):
    "A SimCLR-style list (`<class>_<n>.png` per line) picks the training images: only class a listed, kNN says a"
    from PIL import Image
    import numpy as np
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, colour in zip("ab", ((220, 40, 40), (40, 40, 220))):
            (tmp_path/"data"/split/c).mkdir(parents=True)
            for i in range(3):
                img = np.clip(np.array(colour) + g.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path/"data"/split/c/f"{c}_{i}.png")
    run = make_run(tmp_path/"run", bias=None)
    common = ["--run", str(run), "--data", str(tmp_path/"data"), "--protocol", "knn", "--bs", "4", "--no-progress",
              "--num-workers", "0"]
    assert eval_cli(common)["value"] == 100.  # all training images: colour decides
    (tmp_path/"list.txt").write_text("a_0.png\na_2.png\n")
    row = eval_cli(common + ["--fraction", "0.01", "--subset-file", str(tmp_path/"list.txt")])
    assert (row["value"], row["fraction"]) == (50., 0.01)  # only class a to vote: every image called a
