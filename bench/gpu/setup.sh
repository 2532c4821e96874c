# Sourced at the start of every command on the GPU machine (no network there): unpack the bundle of
# packages it lacks (built here by ../shared/gpu/make-bundle.sh into .gpu/site.tar.xz) and use it.
mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/site.tar.xz
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl, peft, unsloth; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'unsloth', unsloth.__version__)" 2>&1 | tail -1
