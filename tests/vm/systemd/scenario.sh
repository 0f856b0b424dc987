# shellcheck shell=bash
# `tests/vm/scenario.sh systemd`, sourced: systemd as PID 1 on the device.
# Every assertion is on what systemd says (the `ota-vm-systemd:` lines of
# tests/vm/systemd/ota-vm-report: `systemctl show ota-agent`; the
# `ota-vm-journal:` lines: journalctl) or on the server and the disk, never
# on the agent's word alone.
#
# 1. Type=notify: the server is unreachable at first (gate closed), so the
#    agent cannot enroll and must not send READY=1: the unit stays
#    activating/start with the agent running. Gate open: enrolled, READY=1,
#    active/running.
# 2. WatchdogSec=: the first start hangs its main loop after 3 check-ins
#    (test-hooks drop-in); systemd logs "Watchdog timeout", kills and
#    restarts it (NRestarts=1), and the restarted agent is ready again.
# 3. The restarted agent carries on: it takes the rollout v1 -> v2, reboots
#    through `systemctl reboot`, boots B under systemd, commits.
flavor=systemd
clean() { sed 's/\x1b\[[0-9;]*m//g' "$work/console.log" | tr -d '\r'; }
report() { clean | grep -a '^ota-vm-systemd: ' || true; }
prop() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
seen() { clean | grep -a "$1" >/dev/null; }
vm_setup v2
gate=$work/gate
power_on
wait_for 180 "ota-agent.service started (activating, agent running)" \
  seen '^ota-vm-systemd: .*MainPID=[1-9][0-9]* .*ActiveState=activating SubState=start '
# The agent keeps trying to enroll; systemd keeps it activating.
sleep 10
report | grep 'ActiveState=active ' >/dev/null && die "the unit became active before the agent could enroll (no READY=1 expected)"
clean | grep -a 'enrollment failed' >/dev/null || die "the agent did not try (and fail) to enroll while the server was unreachable"
still=$(report | tail -1)
echo "$still" | grep 'ActiveState=activating SubState=start ' >/dev/null || die "ota-agent.service left activating without the server: $still"
log "server unreachable for 10 s: systemd still reports $(echo "$still" | grep -o 'ActiveState=[a-z]* SubState=[a-z-]*') (agent pid $(echo "$still" | prop MainPID))"
touch "$gate"
wait_for 120 "ota-agent.service active/running once the agent enrolled" \
  seen '^ota-vm-systemd: .*NRestarts=0 .*ActiveState=active SubState=running '
ready=$(report | grep 'NRestarts=0 .*ActiveState=active SubState=running ' | sed -n 1p || true)
start_us=$(echo "$ready" | prop ExecMainStartTimestampMonotonic); active_us=$(echo "$ready" | prop ActiveEnterTimestampMonotonic)
clean | grep -a 'enrolled' >/dev/null || die "active without an enrollment"
boot_to_ready=$(printf '%.1f' "$(echo "$active_us / 1000000" | bc -l)")
log "READY=1: active at guest uptime ${boot_to_ready}s, $(echo "($active_us - $start_us) / 1000000" | bc) s after the agent started (the server was unreachable until then)"

# 2. The hang and the watchdog.
wait_for 120 "systemd restarted the hung agent (NRestarts=1, active again)" \
  seen '^ota-vm-systemd: .*NRestarts=1 .*ActiveState=active SubState=running '
clean | grep -a 'test hook: the main loop hangs now' >/dev/null || die "the hang hook never fired (is the guest's agent built with --features test-hooks?)"
wd=$(clean | grep -a '^ota-vm-journal: .*ota-agent.service: Watchdog timeout' | sed -n 1p || true)
[ -n "$wd" ] || die "systemd's journal has no 'Watchdog timeout' for ota-agent.service"
log "systemd: ${wd#ota-vm-journal: }"
hang_at=$(clean | grep -a 'test hook: the main loop hangs now' | sed -n 1p | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p' || true)
again=$(report | grep 'NRestarts=1 .*ActiveState=active SubState=running ' | sed -n 1p | prop ActiveEnterTimestampMonotonic || true)
wd_secs=$(printf '%.1f' "$(echo "$again / 1000000 - $hang_at" | bc -l)")
log "main loop hung at guest uptime ${hang_at}s; the restarted agent was ready ${wd_secs}s later (WatchdogSec=6s, RestartSec=2s)"

# 3. The restarted agent carries on: the update, through systemd's reboot.
rollout_start
wait_for 600 "the update committed" committed
secs=$(since_rollout)
clean | grep -a 'booted slot b version 2.0 .* under systemd' >/dev/null || die "the guest never booted slot b with 2.0 under systemd"
clean | grep -a -E 'Reached target reboot.target|systemd-shutdown' >/dev/null || die "the agent's reboot did not go through systemd"
# systemd stops the agent (and the `systemctl reboot` it waits for) on the
# way down: a clean stop, not a failed unit (agent/tests/boot_truth.rs).
if clean | grep -a -E "ota-agent.service: Failed with result 'exit-code'|reboot command .* failed" >/dev/null; then
  die "the agent's stop during its own reboot was a failure: $(clean | grep -a -E "Failed with result 'exit-code'|reboot command .* failed" | sed -n 1p)"
fi
# (the server may see the commit before the reporter's next sample)
b_lines() { clean | sed -n '/booted slot b version 2.0/,$p' | grep -a '^ota-vm-systemd: .*NRestarts=0 .*ActiveState=active SubState=running ' || true; }
b_active() { [ -n "$(b_lines)" ]; }
wait_for 60 "on slot b, systemd reports ota-agent.service active" b_active
b_ready=$(b_lines | sed -n 1p)
b_up=$(printf '%.1f' "$(echo "$(echo "$b_ready" | prop ActiveEnterTimestampMonotonic) / 1000000" | bc -l)")
log "slot b (token held, no hang): ota-agent.service active at guest uptime ${b_up}s"
sleep 2; power_cut
slot_b_is "$vm/v2.img" || die "slot B differs from 2.0"
[ "$(env_var boot_part)" = b ] && [ "$(env_var upgrade_available)" = 0 ] || die "boot state after commit: $(host_env | tr '\n' ' ')"
echo "RESULT systemd: Type=notify: activating until the agent enrolled, active at guest uptime ${boot_to_ready}s; watchdog: hung main loop killed by systemd (Watchdog timeout), restarted (NRestarts=1) and ready ${wd_secs}s after the hang; then v1 -> v2 through systemctl reboot committed ${secs}s after rollout start, slot B == 2.0; on B the agent was ready at guest uptime ${b_up}s"
