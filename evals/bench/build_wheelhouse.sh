#!/usr/bin/env bash
# Build the wheelhouse that evals/gpu_suite.sh installs on the GPU machine, which has no network.
#
#   evals/bench/build_wheelhouse.sh [DIR]          (default .wheelhouse, git-ignored; carried to the GPU machine)
#
# The GPU machines seen so far run Python 3.12 with torch, triton, timm and accelerate, but transformers 5.17 (below
# vtoken's floor of 5.18, which silently drops the images) and no diffusers or open_clip. This downloads, for Python
# 3.12 on x86-64 Linux, the wheels of transformers, diffusers and open-clip-torch at the versions installed here
# (where the test-suite passes, inside pyproject.toml's ranges), plus what they need that the GPU image lacks or may
# hold too old: regex (transformers), importlib-metadata and zipp (diffusers), timm >= 1.0.17, ftfy and wcwidth
# (open_clip).
# huggingface-hub, tokenizers and safetensors are the image's (1.33, 0.23.2, 0.8.0 meet transformers' needs; newer
# hub releases need packages the image lacks). vtoken itself is not a wheel: the suite runs it from the checkout.
# Then it checks that the wheelhouse stays under the carry limit, that pip finds every wheel in it offline, and that
# installed over this environment its requirements are met; the suite re-checks them on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-.wheelhouse}
PY=${PYTHON:-python3}
GPU_PYTHON=${GPU_PYTHON:-3.12}
LIMIT_MIB=56  # the run tool carries 64 MiB with the working tree (about 6 MiB)
MIRRORED=(transformers diffusers open-clip-torch timm regex zipp ftfy wcwidth)  # at the versions installed here
FIXED=(importlib-metadata==8.7.0)  # 9 and later need lazy-importer, which the GPU image lacks
PLATFORM=(--python-version "$GPU_PYTHON" --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:)

read -r -a PINS <<< "$("$PY" - "${MIRRORED[@]}" <<'PYTHON'
import importlib.metadata as metadata, sys
print(" ".join(f"{name}=={metadata.version(name)}" for name in sys.argv[1:]))
PYTHON
) ${FIXED[*]}"
echo "pins (installed here): ${PINS[*]}"
"$PY" - "${PINS[@]}" <<'PYTHON'
import re, sys, tomllib
from packaging.specifiers import SpecifierSet
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = {}
for line in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
    name, spec = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*([^;]*)", line).groups()
    declared[name.lower()] = spec.strip()
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if declared.get(name) and version not in SpecifierSet(declared[name]):
        sys.exit(f"build_wheelhouse.sh: {name} {version} is outside vtoken's range {declared[name]}")
PYTHON

rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$OUT" "${PINS[@]}"

size=$(du -sb "$OUT" | cut -f1)
echo "wheelhouse: $(ls "$OUT" | wc -l) wheels, $((size / 1024 / 1024)) MiB ($size bytes) in $OUT"
ls -1 "$OUT"
if [ "$size" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "build_wheelhouse.sh: error: over ${LIMIT_MIB} MiB; the device run carries 64 MiB with the checkout" >&2
  exit 1
fi

# offline: pip finds every pinned wheel for the GPU's Python in the wheelhouse alone
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PY" -m pip install -q --no-index --find-links "$OUT" --no-deps "${PLATFORM[@]}" --target "$scratch" "${PINS[@]}"
echo "offline install from $OUT alone: ok (into a scratch folder, Python $GPU_PYTHON wheels)"
# and installed over this environment (torch etc. present, as on the GPU machine), every requirement is met
"$PY" - "$scratch" <<'PYTHON'
import sys
from vtoken.evals.bench.gpu_suite import unmet_requirements
sys.path.insert(0, sys.argv[1])  # the wheels shadow what is installed, as the suite's PYTHONPATH does there
problems = unmet_requirements(__import__("pathlib").Path(sys.argv[1]))
print("requirements of the wheels over this environment:", "met" if not problems else "UNMET")
for problem in problems:
    print("  " + problem)
sys.exit(1 if problems else 0)
PYTHON
