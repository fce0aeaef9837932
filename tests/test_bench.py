"The benchmark command runs and prints its ratio line (timings themselves are checked by hand, never here)."
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def test_bench_attention_cli_format():
    "`mgab-bench attention` prints per-variant times and peaks, and a last line whose ratios are those numbers'"
    out = subprocess.run(["mgab-bench", "attention", "--arch", "vit_tiny_patch16_224", "--img-size", "32", "--bs", "2",
                          "--rounds", "1"], capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    r = re.fullmatch(r"attention: ratio=(\d+\.\d+) mem_ratio=(\d+\.\d+)", last)
    assert r, last
    x = {k: float(v) for k, v in re.findall(r"^\s+(\w+)\s+step\s+[\d.]+ ms\s+\(([\d.]+)x vanilla\)", out.stdout, re.M)}
    mb = {k: float(v) for k, v in re.findall(r"^\s+(\w+)\s+step peak memory\s+([\d.]+) MB", out.stdout, re.M)}
    assert set(x) == {"vanilla", "biased", "explicit"} and x["vanilla"] == 1., out.stdout
    assert abs(float(r[1]) - x["biased"]) <= 1e-3  # the ratio is the biased step over the vanilla one
    assert abs(float(r[2]) - mb["biased"] / mb["vanilla"]) <= 2e-3 + 0.1 / mb["vanilla"], out.stdout


def test_bench_help_and_unknown_name():
    "The dispatcher lists the benchmarks without importing them; an unknown name exits 2"
    out = subprocess.run(["mgab-bench", "--help"], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0 and re.search(r"^\s+attention\s+biased ViT", out.stdout, re.M), out.stdout
    out = subprocess.run(["mgab-bench", "nope"], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 2 and "unknown benchmark 'nope'" in out.stderr


def test_bench_pretrain_cli_format(capsys):
    "`mgab-bench pretrain` prints images/s of both MAEs, and a last line whose ratio is those numbers'"
    out = subprocess.run(["mgab-bench", "pretrain", "--arch", "vit_tiny_patch16_224", "--img-size", "32", "--bs", "2",
                          "--seconds", "0.5", "--device", "cpu"], capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\s+(\w+)\s+([\d.]+) images/s\s+step ([\d.]+) ms", out.stdout, re.M)
    ips, ms = {k: float(v) for k, v, _ in rows}, {k: float(t) for k, _, t in rows}
    assert set(ips) == {"vanilla", "biased"}, out.stdout
    assert all(abs(ips[k] - 2 / (ms[k] / 1000)) <= 0.05 + 1e-3 * ips[k] for k in ips), out.stdout  # bs 2 / step time
    r = re.fullmatch(r"pretrain: ratio=(\d+\.\d+) images_per_s=([\d.]+)", out.stdout.strip().splitlines()[-1])
    assert r and float(r[2]) == ips["biased"], out.stdout
    assert abs(float(r[1]) - ms["biased"] / ms["vanilla"]) <= 1e-3 + 0.1 / ms["vanilla"], out.stdout  # step ratio
    from mgab.bench import main  # the same entry function, in this process: a usage error exits 2 with one line
    code = main(["pretrain", "--seconds", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--seconds" in err[-1], err
