#!/usr/bin/env bash
# The whole test suite. The README's test command runs it after `pip install -e ".[dev]"`; .ci/run runs that command.
#   1. nbdev-export + nbdev-clean must leave the notebooks and mgab/ exactly as committed,
#   2. nbdev-test runs every notebook (cells flagged `slow`/`gpu` are skipped; `--flags slow` runs them),
#   3. mgab-docs renders every processed notebook to HTML (fails on one that does not render),
#   4. pytest runs tests/ on two workers (`--runslow` or MGAB_SLOW=1 adds the slow ones); its summary is printed last.
# `set -e` makes any failure, pytest's exit code 5 ("no tests collected") included, fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"

echo "== nbdev-export / nbdev-clean"
nbdev-export
nbdev-clean
if git rev-parse --git-dir >/dev/null 2>&1; then
  dirty=$(git status --porcelain -- nbs mgab pyproject.toml)
  if [ -n "$dirty" ]; then
    echo "The notebooks and mgab/ are out of step with what is committed:"; echo "$dirty"
    echo "Run nbdev-export && nbdev-clean, review and commit the result."; exit 1
  fi
fi

echo "== nbdev-test"
OMP_NUM_THREADS=1 nbdev-test --n-workers 2  # two notebooks at a time, one thread each: no oversubscription

echo "== mgab-docs (offline HTML docs; every notebook must render)"
mgab-docs --no-execute --out _docs

echo "== pytest"
# two workers (pytest-xdist), one test module per worker at a time so module fixtures are built once
OMP_NUM_THREADS=1 python -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile --durations=10 "$@"
