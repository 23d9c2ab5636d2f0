#!/usr/bin/env bash
# Test-only peers, installed beside (not into) cai's dependencies:
# - TRL 1.12 (the last release with PPO) into .peers/trl112, for tests/test_ppo_trl_parity.py;
# - Debian's chromium, for rendering report.html in tests/test_report.py (needs root; without it
#   that test skips and says why).
set -u
cd "$(dirname "$0")/.."
if [ ! -f .peers/trl112/trl/experimental/ppo/ppo_trainer.py ]; then
  python3 -m pip install -q --no-deps --target .peers/trl112 trl==1.12.0 || echo "install_peers: TRL 1.12 not installed; its parity test will skip"
fi
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "install_peers: chromium not installed; the report rendering test will skip"
  else
    echo "install_peers: not root, chromium not installed; the report rendering test will skip"
  fi
fi
exit 0
