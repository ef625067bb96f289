#!/usr/bin/env bash
# One-command install into ./.venv (or $PLEXREC_VENV).
#   scripts/install.sh          CPU: torch 2.13.0 CPU wheel + fbgemm-gpu-cpu 1.8.0 + torchrec 1.8.0
#   scripts/install.sh --gpu    GPU: CUDA torch 2.13.0 + fbgemm-gpu 1.8.0 + torchrec 1.8.0
# torchrec goes in with --no-deps: its metadata asks for the CUDA `fbgemm-gpu`, which on a
# CPU machine shadows `fbgemm-gpu-cpu` and fails to import (libtorch_cuda.so missing).
# Its real dependencies are plexrec's own dependencies in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PLEXREC_VENV:-.venv}"
flavour=cpu
[ "${1:-}" = "--gpu" ] && flavour=gpu

if [ ! -x "$venv/bin/python" ]; then
  echo "plexrec: creating virtual environment $venv"
  python3 -m venv "$venv"
fi
pip_install() {
  # This machine's pip config names local index folders that may be absent; drop that noise.
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" -e "torchrec 1.8.0 requires fbgemm-gpu" -e "dependency resolver does not currently" || true; }
}

if [ "$flavour" = gpu ]; then
  pip_install "torch==2.13.0" "fbgemm-gpu==1.8.0"
  pip_install --no-deps "torchrec==1.8.0"
  pip_install -e ".[dev]"
else
  pip_install "torch==2.13.0" "fbgemm-gpu-cpu==1.8.0"
  pip_install --no-deps "torchrec==1.8.0"
  pip_install -e ".[cpu,dev]"
fi
# Debian's redis-server for the redis store profile and its tests (they start their own).
if ! command -v redis-server > /dev/null; then
  if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
    echo "plexrec: installing redis-server (Debian package)"
    apt-get install -y -q redis-server > /dev/null 2>&1 \
      || { apt-get update -q > /dev/null && apt-get install -y -q redis-server > /dev/null; }
  else
    echo "plexrec: redis-server is missing; install it (apt-get install redis-server) for the redis profile" >&2
  fi
fi
# h2load (Debian's nghttp2-client): the C load generator of bench/serving.py; nothing else needs it.
if ! command -v h2load > /dev/null && command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q nghttp2-client > /dev/null 2>&1 \
    || echo "plexrec: nghttp2-client (h2load) not installed; bench/serving.py skips its h2load cells" >&2
fi
# pyspark (the `spark` extra, in `dev`) runs Spark in a JVM: the spark example engine and its tests need Java 17 or 21.
if ! command -v java > /dev/null; then
  echo "plexrec: java is missing; the spark example engine and its tests need Java 17 or 21 (apt-get install openjdk-17-jre-headless)" >&2
fi
# Fail here, not in the first test, if the fbgemm/torchrec pair is broken.
"$venv/bin/python" -c "import fbgemm_gpu, torchrec; print('plexrec: torch', __import__('torch').__version__, '| torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0', '| install OK')"
