#!/usr/bin/env bash
# Not run in CI. Installs the newest release of every dependency vtoken caps, beyond the caps, runs the suite and
# prints what breaks. Raising a cap is then one decision: if nothing broke, raise it in pyproject.toml (and in the
# README's table); if something did, fix it first (upstream internals live in adapters/_compat.py).
#   .ci/canary.sh            # fresh .canary-venv, then the suite; prints one line per package that broke something
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${CANARY_VENV:-.canary-venv}
# No constraints: a constraint file in the machine's pip configuration (a torch cap) would hide the newest releases
export PIP_CONSTRAINT=$(mktemp /tmp/vtoken-canary-constraints.XXXXXX)
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q -e ".[dev,video,eval]" || exit 1
for package in transformers diffusers timm open-clip-torch accelerate lmms-eval filelock numpy torch; do
  # one at a time, so a release that cannot install (or a machine cap on torch) does not hold back the others
  pip install -q --upgrade "$package" 2>&1 | grep -vE "dependency resolver|incompatible|^$" | head -3
done
echo "== installed beyond vtoken's declared ranges:"
python - <<'PY'
from vtoken.adapters._compat import declared_ranges, installed_versions, untested_versions
ranges = declared_ranges(names=None)  # extras' pins too (filelock < 4 for lmms-eval)
lines = untested_versions(installed_versions(tuple(ranges)), ranges)
print("\n".join("   " + line for line in lines) or "   nothing: every newest release is inside the ranges")
PY
report=$(mktemp /tmp/vtoken-canary.XXXXXX.xml)
python -m pytest -q -n auto --dist loadgroup -p no:cacheprovider --tb=short -W ignore::RuntimeWarning --junitxml="$report" > "$venv/pytest.log" 2>&1
status=$?
echo "== what broke, by package (the innermost installed package in each failure's traceback):"
python .ci/breakage.py "$report"
echo "== the suite's last lines (all of it: $venv/pytest.log):"
tail -15 "$venv/pytest.log"
echo "== pytest exit status $status (0: the caps above can be raised)"
exit "$status"
