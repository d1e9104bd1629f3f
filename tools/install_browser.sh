#!/usr/bin/env bash
# Chromium for the page test (tests/test_serve_page.py), from Debian's packages. Best effort: where
# it cannot be installed (not root, no apt), the test is skipped and says why.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: not root or no apt-get; the page test will be skipped"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
  || echo "install_browser: apt-get could not install chromium; the page test will be skipped"
exit 0
