# Sourced at the start of a command on the lent GPU host (no network there): installs the carried
# pure-Python wheels (.whl/) into /tmp/site (kept while the machine stays warm, so later calls need
# not carry them again), lays out the pocketdiff namespace in this (throw-away) copy of the tree as
# an install would (export/, runtimes/, compress/ linked inside pocketdiff/; the current folder comes
# first on sys.path for `python -m`, so the layout must be right here) and sets PYTHONPATH.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
[ -d /tmp/site ] || { echo "no wheels: carry .whl/ (diffusers and its pure-Python deps)"; return 1; }
for d in compress export runtimes; do ln -sfn "$PWD/$d" "pocketdiff/$d"; done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers, pocketdiff.export; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
