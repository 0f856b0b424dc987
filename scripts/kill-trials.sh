#!/usr/bin/env bash
# Runs the agent's kill -9 trials many times: the real agent binary is
# SIGKILLed at random moments (download, apply, install, reboot, commit) and
# restarted until the update commits; every trial must end on the old image
# or the verified new one.
#
#   scripts/kill-trials.sh [TRIALS] [SEED]     # default 200 trials, random seed
#
# The seed is printed; pass it back to reproduce a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-200}
export OTA_KILL_TRIALS=$trials
if [[ -n ${2:-} ]]; then export OTA_KILL_SEED=$2; fi
exec cargo test --release -p ota-agent --test kill9 -- --nocapture
