"Distillation end to end on the embedded data: biased teacher run -> mask-free student run -> evaluation."
import json
import pytest
import torch
from pathlib import Path
from mgab.core import UsageError



TINY = dict(name="vit_tiny_patch16_224", patch_size=8, img_size=64, num_classes=0, depth=4)


@pytest.fixture(scope="module")
def mae_teacher(embedded_store, tmp_path_factory):
    from mgab.mae import pretrain_mae
    path, store = embedded_store
    out = tmp_path_factory.mktemp("runs") / "mae"
    return pretrain_mae(dict(method="mae", data=str(path), masks=str(store), out=str(out), epochs=1, bs=128,
                             model=TINY, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, progress=False,
                             num_workers=0))


def test_mae_distillation_run(mae_teacher, tmp_path):
    from mgab.distill import distill_run
    from mgab.runs import RunFolder
    teacher_u = RunFolder(mae_teacher).load_encoder().bias_values()["u_pos"]
    assert teacher_u.abs().max() > 0  # the teacher learned a bias to distil
    out = tmp_path / "student"
    distill_run(dict(teacher=str(mae_teacher), out=str(out), epochs=1, bs=128, layers=[0, 1], progress=False,
                     num_workers=0))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["distill"] is True and cfg["teacher"] == str(mae_teacher) and cfg["model"]["bias"] is None
    assert cfg["data"] and cfg["masks"]  # taken from the teacher run
    rows = json.loads((out / "metrics.json").read_text())
    assert rows[0]["att_loss"] > 0 and rows[0]["mim_loss"] > 0
    assert rows[0]["train_loss"] == pytest.approx(rows[0]["mim_loss"] + rows[0]["att_loss"], rel=1e-4)
    student = RunFolder(out).load_encoder()
    assert student.blocks[0].attn.bias is None and student.bias_parameters() == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert torch.equal(student(x), student(x, torch.randint(0, 6, (2, 64))))  # takes no masks
    info = json.loads((out / "distill.json").read_text())
    assert info["attn_gap_after"] == pytest.approx(rows[0]["attn_gap"], rel=1e-5)
    # resume: two more epochs continue from the checkpoint, the first row stays, so does the gap before the first fit
    distill_run(dict(teacher=str(mae_teacher), out=str(out), epochs=2, bs=128, layers=[0, 1], progress=False,
                     num_workers=0), resume=True)
    rows2 = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows2] == [0, 1] and rows2[0] == rows[0]
    info2 = json.loads((out / "distill.json").read_text())
    assert info2["attn_gap_before"] == info["attn_gap_before"]
    assert info2["attn_gap_after"] == pytest.approx(rows2[1]["attn_gap"], rel=1e-5)


@pytest.fixture(scope="module")
def gap_teacher(embedded_store, tmp_path_factory):
    "A tiny teacher (32 px, depth 2) whose bias grew large enough to leave a student-teacher attention gap"
    from mgab.mae import pretrain_mae
    path, store = embedded_store
    out = tmp_path_factory.mktemp("runs") / "mae-gap"
    model = dict(name="vit_tiny_patch16_224", patch_size=8, img_size=32, num_classes=0, depth=2)
    return pretrain_mae(dict(method="mae", data=str(path), masks=str(store), out=str(out), epochs=2, bs=128, lr=1.5e-3,
                             bias_lr_mult=100., model=model, progress=False, num_workers=0))


def test_distillation_closes_the_attention_gap(gap_teacher, tmp_path):
    "A random student moves its attention towards the teacher's: the gap on the fixed batch falls"
    from mgab.distill import distill_run
    out = tmp_path / "student"
    distill_run(dict(teacher=str(gap_teacher), out=str(out), epochs=2, bs=128, student_init="scratch", progress=False,
                     num_workers=0))
    info = json.loads((out / "distill.json").read_text())
    assert set(info) == {"attn_gap_before", "attn_gap_after", "loss", "lam", "student_init"}
    assert (info["loss"], info["lam"], info["student_init"]) == ("kl", 1.0, "scratch")
    assert 0 < info["attn_gap_after"] < info["attn_gap_before"] < 1
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1] and all(0 < r["attn_gap"] < 1 for r in rows)
    assert rows[-1]["attn_gap"] == pytest.approx(info["attn_gap_after"], rel=1e-5)  # the model after the last epoch
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # no half-written file left


@pytest.mark.parametrize("init", ["teacher", "scratch"])
def test_student_init(gap_teacher, init):
    from mgab.distill import distill_models
    model, _ = distill_models(gap_teacher, student_init=init)
    t = {k: v for k, v in model.teacher.state_dict().items() if k.rsplit(".", 1)[-1] not in ("u_pos", "u_neg")}
    s = model.student.state_dict()
    assert set(s) <= set(t) | {k for k in s if k.rsplit(".", 1)[-1] in ("u_pos", "u_neg")}
    same = [k for k in s if k in t and torch.equal(s[k], t[k])]
    learned = [k for k in t if k.startswith("encoder.blocks") and k.endswith(("qkv.weight", "fc1.weight"))]
    if init == "teacher": assert sorted(same) == sorted(t)
    else: assert learned and not set(learned) & set(same)  # random weights wherever the teacher learned some
    with pytest.raises(ValueError, match="student_init"): distill_models(gap_teacher, student_init="random")


def test_distilling_a_vanilla_run_is_refused(mae_teacher, tmp_path):
    from mgab.distill import distill_run
    cfg = json.loads((mae_teacher / "config.json").read_text())
    fake = tmp_path / "vanilla"
    (fake / "checkpoints").mkdir(parents=True)
    (fake / "checkpoints" / "last.pth").write_bytes((mae_teacher / "checkpoints" / "last.pth").read_bytes())
    (fake / "config.json").write_text(json.dumps(dict(cfg, model=dict(cfg["model"], bias=None))))
    (fake / "finished.json").write_text(json.dumps(dict(finished=True, epochs=cfg["epochs"])))
    with pytest.raises(ValueError, match="without bias"):
        distill_run(dict(teacher=str(fake), out=str(tmp_path / "s"), epochs=1))
    with pytest.raises(UsageError, match="no config.json"):  # a usage error: `mgab-distill` exits 2
        distill_run(dict(teacher=str(tmp_path / "nothing"), out=str(tmp_path / "s"), epochs=1))
    with pytest.raises(ValueError, match="student_init='scratch'"):  # the old flag is gone, not silently ignored
        distill_run(dict(teacher=str(mae_teacher), out=str(tmp_path / "s"), epochs=1, from_scratch=True))


def _small_copy(path, dest, per_class=12):
    "An ImageFolder of symlinks to the first `per_class` train images of each class, with its own mask store"
    from mgab.masks import SuperpixelMasker
    from mgab.store import make_mask_store
    for split, n in (("train", per_class), ("val", 2)):
        for cls in sorted((path / split).iterdir()):
            (dest / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]: (dest / split / cls.name / f.name).symlink_to(f.resolve())
    return dest, make_mask_store(dest, dest.parent / "small-store", SuperpixelMasker("slic"), progress=False).root


def test_dino_distillation_run(embedded_store, tmp_path):
    from mgab.dino import pretrain_dino
    from mgab.distill import distill_run
    from mgab.runs import RunFolder
    path, store = _small_copy(embedded_store[0], tmp_path / "small")  # multi-crop is costly on 2 CPU cores
    teacher = pretrain_dino(dict(data=str(path), masks=str(store), out=str(tmp_path / "dino"), epochs=1, bs=40,
                                 model=dict(TINY, dynamic_img_size=True), global_size=64, local_size=32, n_local=2,
                                 out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32, progress=False, num_workers=0))
    out = tmp_path / "student"
    distill_run(dict(teacher=str(teacher), out=str(out), epochs=1, bs=40, progress=False, num_workers=0))
    rows = json.loads((out / "metrics.json").read_text())
    assert rows[0]["kd_loss"] > 0 and rows[0]["train_loss"] == pytest.approx(rows[0]["kd_loss"], rel=1e-4)
    info = json.loads((out / "distill.json").read_text())
    assert (info["loss"], info["lam"], info["student_init"]) == (None, None, "teacher")  # Eq. 8 matches no attention
    assert 0 < info["attn_gap_before"] < 1 and info["attn_gap_after"] == pytest.approx(rows[0]["attn_gap"], rel=1e-5)
    enc = RunFolder(out).load_encoder()
    assert enc.blocks[0].attn.bias is None
    # initialised from the teacher (EMA) weights, then trained: close to it but not equal
    t_enc = RunFolder(teacher).load_encoder()
    w_s, w_t = enc.blocks[0].attn.qkv.weight, t_enc.blocks[0].attn.qkv.weight
    assert not torch.equal(w_s, w_t) and (w_s - w_t).norm() < 0.5 * w_t.norm()
