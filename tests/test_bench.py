"The benchmark command runs and prints its ratio line (timings themselves are checked by hand, never here)."
import re
import subprocess
import sys


def test_bench_attention_cli_format():
    out = subprocess.run([sys.executable, "-c", "from mgab.bench import main; main()", "attention", "--arch",
                          "vit_tiny_patch16_224", "--img-size", "32", "--bs", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    r = re.fullmatch(r"attention: ratio=(\d+\.\d+) mem_ratio=(\d+\.\d+)", last)
    assert r and float(r[1]) > 0 and float(r[2]) > 0, last
    assert "explicit" in out.stdout


def test_bench_unknown_name():
    out = subprocess.run([sys.executable, "-c", "import sys; from mgab.bench import main; sys.exit(main())", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown benchmark 'nope'" in out.stderr
