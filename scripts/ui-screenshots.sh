#!/usr/bin/env bash
# Rewrites docs/ui/*.png from a real run of the dashboard's browser test
# (server/tests/ui_browser.rs): headless Chromium against a real ota-server
# with simulated devices. Needs chromium and chromium-driver (apt).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/ui
OTA_UI_SCREENSHOTS="$PWD/docs/ui" CI=true \
  cargo test -p ota-server --test ui_browser -- --nocapture
ls -l docs/ui/*.png
