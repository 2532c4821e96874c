#!/usr/bin/env bash
# Ray Serve for the GPU machine (no network there), as two archives that each fit beside the main bundle in a
# device call's carry limit (64 MiB): .gpu/ray.tar.xz (ray itself, ~31 MB, without its Java jars, RLlib and
# ray.llm) and .gpu/raydeps.tar.xz (what ray[serve] needs that neither the machine nor .gpu/site.tar.xz has,
# ~28 MB). Carry ".gpu/site.tar.xz" and ".gpu/ray.tar.xz" in one call, ".gpu/raydeps.tar.xz" in the next while
# the machine is warm (carried files stay there); bench/gpu/setup.sh then unpacks both into its path.
#
#   bash bench/gpu/make_ray_bundle.sh [RAY_VERSION]   # default 2.60.0, the cluster extra's pin
set -euo pipefail
version=${1:-2.60.0}
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=()
for p in manylinux1_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$work/whl" "ray[serve]==$version"
# Already there: on the machine (torch's, transformers' and httpx's dependencies) or in .gpu/site.tar.xz.
present="numpy fastapi starlette uvicorn pydantic pydantic_core annotated_types annotated_doc typing_inspection
python_dotenv opentelemetry_api importlib_metadata certifi charset_normalizer idna urllib3 requests packaging pyyaml
filelock typing_extensions jinja2 markupsafe anyio h11"
mkdir -p "$work/ray" "$work/deps" "$root/.gpu"
for wheel in "$work"/whl/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z' 'a-z')
  if [ "$name" = ray ]; then unzip -q "$wheel" -d "$work/ray"
  elif ! grep -qw "$name" <<< "$present"; then unzip -q -o "$wheel" -d "$work/deps"; fi
done
rm -rf "$work/ray/ray/jars" "$work/ray/ray/rllib" "$work/ray/ray/llm"  # not used by Serve; 40 MB unpacked
find "$work" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$work/ray" -cf - . | xz -T0 -6 > "$root/.gpu/ray.tar.xz"
tar -C "$work/deps" -cf - . | xz -T0 -6 > "$root/.gpu/raydeps.tar.xz"
ls -l "$root/.gpu/ray.tar.xz" "$root/.gpu/raydeps.tar.xz"
