# Sourced at the start of every command on the GPU machine (no network there): unpack the bundle of
# packages it lacks (built here by ../shared/gpu/make-bundle.sh into .gpu/site.tar.xz) and use it; Ray Serve
# too once both its archives have arrived (bench/gpu/make_ray_bundle.sh: they travel in two calls).
# A later call on a warm machine finds /tmp/site unpacked already: it may carry other archives instead.
[ -f .gpu/site.tar.xz ] || [ ! -d /tmp/site/unsloth ] && { mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/site.tar.xz; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -f .gpu/ray.tar.xz ] && [ -f .gpu/raydeps.tar.xz ]; then
  [ -f /tmp/raysite/.complete ] || { rm -rf /tmp/raysite && mkdir -p /tmp/raysite && tar -C /tmp/raysite -xJf \
    .gpu/ray.tar.xz && tar -C /tmp/raysite -xJf .gpu/raydeps.tar.xz && touch /tmp/raysite/.complete; }
  export PYTHONPATH=/tmp/site:/tmp/raysite:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl, peft, unsloth; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'unsloth', unsloth.__version__)" 2>&1 | tail -1
