"mgab-pretrain: config building, argument errors, dispatch, and (with mgab.data) an end-to-end run with resume."
import json
import os
import subprocess
import sys
from pathlib import Path
import pytest
import inspect
from mgab.cli.train import method_defaults, pretrain_config, pretrain_main
from mgab.core import UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folders(tmp_path):
    (tmp_path/"data").mkdir(); (tmp_path/"masks").mkdir()
    return tmp_path


def _error(argv, capsys):
    "The usage error (one line, exit 2 through `cli_main`) that `pretrain_config` raises"
    with pytest.raises(UsageError) as e: pretrain_config(argv)
    return str(e.value)


def test_mae_config_from_flags(folders):
    d = folders
    cfg, resume = pretrain_config([
        "--method", "mae", "--data", str(d/"data"), "--masks", str(d/"masks"), "--arch", "vit_small_patch16_224",
        "--img-size", "96", "--epochs", "400", "--bs", "128", "--blr", "1e-4", "--bias", "fixed", "--relations", "pos",
        "--share-heads", "--share-layers", "--u-pos-init", "0.5", "--num-labels", "7", "--bias-lr-mult", "3",
        "--mask-ratio", "0.6", "--no-norm-pix-loss", "--decoder-embed-dim", "256", "--decoder-depth", "3",
        "--decoder-num-heads", "8", "--decoder-bias", "--weight-decay", "0.1", "--num-workers", "2", "--seed", "7",
        "--no-progress", "--out", str(d/"run")])
    assert not resume
    assert cfg["model"] == dict(name="vit_small_patch16_224", img_size=96, num_classes=0, bias="fixed", relations="pos",
                                share_heads=True, share_layers=True, u_pos_init=0.5, u_neg_init=None, num_labels=7)
    expected = dict(method="mae", data=str((d/"data").resolve()), masks=str((d/"masks").resolve()),
                    missing_masks="error", out=str((d/"run").resolve()), arch="vit_small_patch16_224", img_size=96,
                    epochs=400, bs=128,
                    blr=1e-4, lr=1e-4 * 128 / 256, min_lr=0., warmup_epochs=40., weight_decay=0.1, weight_decay_end=0.1,
                    bias_lr_mult=3., seed=7, num_workers=2, progress=False, mask_ratio=0.6, norm_pix_loss=False,
                    decoder_embed_dim=256, decoder_depth=3, decoder_num_heads=8, decoder_bias=True, precision="auto")
    assert {k: v for k, v in cfg.items() if k != "model"} == expected


def test_mae_defaults_match_mgab_mae(folders):
    "The CLI's MAE defaults are mgab.mae's (the CLI does not import it before parsing)"
    from mgab.mae import MAE_DEFAULTS, mae_config
    d = folders
    cfg, _ = pretrain_config(["--method", "mae", "--data", str(d/"data"), "--masks", str(d/"masks"), "--epochs", "1600",
                              "--out", str(d/"run")])
    direct = mae_config(dict(epochs=1600, out=str(d/"run")))
    for k in ("arch", "img_size", "bs", "blr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
              "bias_lr_mult", "seed", "mask_ratio", "norm_pix_loss", "decoder_bias", "missing_masks", "progress"):
        assert cfg[k] == direct[k], k
    assert cfg["model"]["bias"] == "learnable" and method_defaults("mae") is MAE_DEFAULTS
    # a short run gets a tenth of its epochs as warmup, in both
    short, _ = pretrain_config(["--method", "mae", "--data", str(d/"data"), "--no-bias", "--epochs", "20",
                                "--out", str(d/"run")])
    assert short["warmup_epochs"] == mae_config(dict(epochs=20, out="r"))["warmup_epochs"] == 2.


def test_dino_config_from_flags(folders):
    d = folders
    cfg, _ = pretrain_config(["--method", "dino", "--data", str(d/"data"), "--masks", str(d/"masks"), "--epochs", "300",
                              "--out-dim", "8192", "--n-local", "6", "--local-size", "64", "--teacher-temp", "0.07",
                              "--warmup-teacher-temp-epochs", "30", "--momentum-teacher", "0.99", "--clip-grad", "0",
                              "--freeze-last-layer", "2", "--out", str(d/"run")])
    own = {k: cfg[k] for k in ("out_dim", "n_local", "local_size", "global_size", "teacher_temp", "warmup_teacher_temp",
                               "warmup_teacher_temp_epochs", "momentum_teacher", "clip_grad", "freeze_last_layer")}
    assert own == dict(out_dim=8192, n_local=6, local_size=64, global_size=224, teacher_temp=0.07,
                       warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30, momentum_teacher=0.99, clip_grad=0.,
                       freeze_last_layer=2)
    shared = ("arch", "blr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end")
    assert tuple(cfg[k] for k in shared) == ("vit_small_patch16_224", 5e-4, 1e-6, 10., 0.04, 0.4)
    assert "mask_ratio" not in cfg and "decoder_bias" not in cfg


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_cli_defaults_are_the_python_defaults(folders, method):
    "Every key of the Python config (MAE_DEFAULTS / DINO_DEFAULTS resolved) has the same value from the command line"
    from mgab.mae import mae_config
    from mgab.dino import dino_config
    from mgab.vit import create_vit
    d = folders
    cfg, _ = pretrain_config(["--method", method, "--data", str(d/"data"), "--masks", str(d/"masks"), "--epochs", "20",
                              "--out", str(d/"run")])
    py = (mae_config if method == "mae" else dino_config)(dict(data=cfg["data"], masks=cfg["masks"], out=cfg["out"],
                                                               epochs=20))
    diff = {k: (cfg.get(k, "missing"), v) for k, v in py.items() if k != "model" and cfg.get(k, "missing") != v}
    assert not diff, f"command line vs Python default: {diff}"
    assert {k: cfg["model"][k] for k in py["model"]} == py["model"]
    sig = inspect.signature(create_vit).parameters  # the command line spells out create_vit's bias defaults
    assert {k: v for k, v in cfg["model"].items() if k not in py["model"]} == {
        k: sig[k].default for k in cfg["model"] if k not in py["model"]}
    assert (cfg["bias_lr_mult"], cfg["warmup_epochs"]) == (10., 2.)  # one value for both methods, both entry points


def test_help_shows_the_defaults_of_the_dicts():
    "Every default --help shows is the one of MAE_DEFAULTS / DINO_DEFAULTS / DISTILL_DEFAULTS, each method's own"
    import re
    from mgab.cli.train import _distill_parser, _parser
    from mgab.distill import DISTILL_DEFAULTS
    from mgab.dino import DINO_DEFAULTS
    from mgab.flags import show_default
    from mgab.mae import MAE_DEFAULTS
    pre, dis = _parser(), _distill_parser()
    text = " ".join(pre.format_help().split())
    for k in ("mask_ratio", "out_dim", "momentum_teacher", "blr", "min_lr", "weight_decay", "teacher_temp"):
        parts = [f"{m} {show_default(d[k])}" for m, d in (("mae", MAE_DEFAULTS), ("dino", DINO_DEFAULTS)) if k in d]
        assert f"(default: {', '.join(parts)})" in text, k
    for k in ("bs", "seed", "bias_lr_mult", "precision"):  # both methods alike: one value
        assert MAE_DEFAULTS[k] == DINO_DEFAULTS[k] and f"(default: {show_default(MAE_DEFAULTS[k])})" in text, k
    text = " ".join(dis.format_help().split())
    for flag, k in (("--lambda LAM", "lam"), ("--attn-loss {kl,sse}", "attn_loss"), ("--student-temp", "student_temp"),
                    ("--student-init {teacher,scratch}", "student_init")):
        line = re.escape(flag) + r"(?:(?! --).)*"  # the flag's own help, up to the next flag
        assert re.search(line + r"\(default: " + re.escape(show_default(DISTILL_DEFAULTS[k])) + r"\)", text), k


@pytest.mark.parametrize("extra,message", [
    ([], "--masks STORE is needed"),
    (["--decoder-bias", "--no-bias"], "--masks STORE is needed"),
    (["--masks", "nowhere"], "--masks 'nowhere': no such mask store"),
    (["--no-bias", "--n-local", "2", "--teacher-temp", "0.1"], "--n-local, --teacher-temp: DINO options, not mae"),
    (["--no-bias", "--lr", "1e-3", "--blr", "1e-4"], "not allowed with argument"),
    (["--no-bias", "--bias", "fixed"], "not allowed with argument"),
    (["--no-bias", "--resume"], "--resume: no checkpoint at"),
])
def test_argument_errors(folders, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(folders)
    argv = ["--method", "mae", "--data", "data", "--epochs", "1", "--out", "run"] + extra
    assert message in _error(argv, capsys)


def test_data_and_run_folder_errors(folders, capsys):
    d = folders
    assert f"--data '{d}/none': no such folder" in _error(
        ["--method", "mae", "--data", str(d/"none"), "--no-bias", "--epochs", "1", "--out", str(d/"run")], capsys)
    assert "--mask-ratio: MAE options, not dino" in _error(
        ["--method", "dino", "--data", str(d/"data"), "--no-bias", "--mask-ratio", ".5", "--epochs", "1", "--out", "r"],
        capsys)
    (d/"run"/"checkpoints").mkdir(parents=True); (d/"run"/"checkpoints"/"last.pth").write_bytes(b"")
    argv = ["--method", "mae", "--data", str(d/"data"), "--no-bias", "--epochs", "1", "--out", str(d/"run")]
    assert "already holds a run; add --resume" in _error(argv, capsys)
    (d/"run"/"config.json").write_text(json.dumps(dict(warmup_epochs=0.3, model=dict(name="vit_tiny_patch16_224"))))
    cfg, resume = pretrain_config(argv[:-4] + ["--epochs", "20", "--out", str(d/"run"), "--resume"])
    assert resume and cfg["warmup_epochs"] == 0.3  # extending a run keeps its automatic warmup


def test_mask_free_options(folders):
    d = folders
    base = ["--method", "mae", "--data", str(d/"data"), "--epochs", "1", "--out", str(d/"run")]
    cfg, _ = pretrain_config(base + ["--no-bias"])
    assert cfg["model"]["bias"] is None and cfg["masks"] is None
    cfg, _ = pretrain_config(base + ["--missing-masks", "empty"])  # biased, every image mask-free: explicit
    assert cfg["model"]["bias"] == "learnable" and cfg["masks"] is None and cfg["missing_masks"] == "empty"


def test_dispatch(folders, monkeypatch, capsys):
    import mgab.mae
    got = {}
    def fake(config, resume=False):
        got.update(config=config, resume=resume)
        return Path(config["out"])
    monkeypatch.setattr(mgab.mae, "pretrain_mae", fake)
    d = folders
    assert pretrain_main(["--method", "mae", "--data", str(d/"data"), "--no-bias", "--epochs", "3",
                          "--out", str(d/"run")]) == 0  # a console script's return value is its exit status
    assert got["config"]["method"] == "mae" and got["config"]["epochs"] == 3 and got["resume"] is False
    out = capsys.readouterr().out
    assert "mae vit_base_patch16_224 (no bias)" in out and f"run folder {(d/'run').resolve()}" in out
    import mgab.dino
    monkeypatch.setattr(mgab.dino, "pretrain_dino", fake)
    pretrain_main(["--method", "dino", "--data", str(d/"data"), "--masks", str(d/"masks"), "--epochs", "3",
                   "--out", str(d/"run2")])
    assert got["config"]["method"] == "dino" and got["config"]["out_dim"] == 65536


def test_module_entry_point_reports_errors(folders):
    "`python -m mgab.cli.train` (what `accelerate launch -m mgab.cli.train` runs) exits 2 with the message"
    d = folders
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "mgab.cli.train", "--method", "mae", "--data", str(d/"data"), "--epochs",
                        "1", "--out", str(d/"run")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "mgab-pretrain: error: --masks STORE is needed" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mgab.cli.train", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "--decoder-bias" in r.stdout and "--out-dim" in r.stdout


def test_parsing_imports_no_torch():
    "Argument errors come before the heavy imports"
    code = ("import sys; from mgab.cli.train import pretrain_config\n"
            "try: pretrain_config(['--method', 'mae'])\nexcept ValueError: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_end_to_end_with_resume(tmp_path, capsys):
    from mgab.datasets import embedded_dataset
    from mgab.masks import SuperpixelMasker
    from mgab.store import make_mask_store
    root = embedded_dataset()
    make_mask_store(root, tmp_path/"masks", SuperpixelMasker(c=5), progress=False)
    argv = ["--method", "mae", "--data", str(root), "--masks", str(tmp_path/"masks"), "--arch", "vit_tiny_patch16_224",
            "--img-size", "32", "--bs", "32", "--lr", "1e-3", "--num-workers", "0", "--out", str(tmp_path/"run")]
    pretrain_main(argv + ["--epochs", "1"])
    assert "train_loss" in capsys.readouterr().out  # fastai's progress display
    pretrain_main(argv + ["--epochs", "2", "--resume"])
    run = tmp_path/"run"
    rows = json.loads((run/"metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1]
    cfg = json.loads((run/"config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["model"]["img_size"] == 32 and cfg["masks"] == str((tmp_path/"masks").resolve())
    from mgab.runs import RunFolder
    u = RunFolder(run).load_encoder().bias_values()["u_pos"]  # the saved encoder is the one the log followed
    assert float(u.mean()) == pytest.approx(rows[-1]["u_pos_mean"], abs=1e-7) and u.abs().max() > 1e-4


@pytest.fixture(scope="module")
def distill_teacher(tmp_path_factory, tiny_embedded):
    "A finished biased MAE run on 20 tiny embedded images (32 px crops, depth 2): something for mgab-distill to distil"
    from mgab.mae import pretrain_mae
    data, store = tiny_embedded
    model = dict(name="vit_tiny_patch16_224", patch_size=8, img_size=32, num_classes=0, depth=2)
    out = tmp_path_factory.mktemp("distill-cli")/"teacher"
    return pretrain_mae(dict(method="mae", data=str(data), masks=str(store), out=str(out), epochs=1, bs=8, model=model,
                             progress=False, num_workers=0))


def test_distill_entry_point_student_init(distill_teacher, tmp_path):
    "`mgab-distill --student-init scratch` runs through the installed entry point; a bad value exits 2"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    argv = ["mgab-distill", "--teacher", str(distill_teacher), "--epochs", "1", "--bs", "8", "--num-workers", "0",
            "--no-progress"]
    out = tmp_path/"student"
    r = subprocess.run(argv + ["--out", str(out), "--student-init", "scratch"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((out/"config.json").read_text())["student_init"] == "scratch"
    info = json.loads((out/"distill.json").read_text())
    assert info["student_init"] == "scratch" and info["loss"] == "kl" and info["lam"] == 1.
    assert all("attn_gap" in row for row in json.loads((out/"metrics.json").read_text()))
    r = subprocess.run(argv + ["--out", str(tmp_path/"bad"), "--student-init", "random"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--student-init: invalid choice: 'random'" in r.stderr
    assert not (tmp_path/"bad").exists()
