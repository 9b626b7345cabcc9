#!/usr/bin/env bash
# mypy over clbench/, strategies/ and scenarios/ as the installed package lays them out.
# strategies/ and scenarios/ import as clbench.strategies / clbench.scenarios (pyproject's
# package-dir), which mypy cannot follow from the source tree, so it checks a scratch tree of
# symlinks in that layout; error paths point at the real files.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/clbench"
for entry in "$repo"/clbench/*; do ln -s "$entry" "$scratch/clbench/"; done
ln -s "$repo/strategies" "$scratch/clbench/strategies"
ln -s "$repo/scenarios" "$scratch/clbench/scenarios"
cd "$scratch"
mypy --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" -p clbench "$@" \
  | sed -e "s#^clbench/strategies/#strategies/#" -e "s#^clbench/scenarios/#scenarios/#" -e "s#^clbench/#clbench/#"
exit "${PIPESTATUS[0]}"
