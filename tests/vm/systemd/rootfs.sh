# shellcheck shell=bash
# Sourced by tests/vm/build.sh for `build.sh systemd`: turns the busybox
# slot userland in $r into a systemd system. $w/sd holds systemd, dbus and
# their libraries (dpkg-deb -x). What a device maker's image would hold:
# systemd as PID 1, journald, dbus, the real deploy/ota-agent.service with a
# drop-in; and nothing the test does not need (masked: each unit costs
# seconds of boot under TCG).
sd=$w/sd
# Not needed on the device: documentation, charset converters, hardware
# databases (no udev), SysV scripts.
rm -rf "$sd"/usr/share/{doc,man,locale,lintian,bug,info} "$sd"/usr/lib/aarch64-linux-gnu/gconv \
  "$sd"/lib/udev "$sd"/etc/init.d "$sd"/usr/lib/aarch64-linux-gnu/{engines-3,ossl-modules}
cp -a --remove-destination "$sd"/. "$r"/
rm -f "$r/sbin/init"
ln -s /lib/systemd/systemd "$r/sbin/init"
mkdir -p "$r"/{var,root,etc/systemd/system,etc/ota-agent/keys,etc/systemd/journald.conf.d}
# The agent: the real unit, unchanged, and the test's drop-in.
cp "$root/deploy/ota-agent.service" "$r/etc/systemd/system/ota-agent.service"
cp -r "$here/systemd/ota-agent.service.d" "$r/etc/systemd/system/"
for u in ota-vm-setup.service ota-vm-report.service; do cp "$here/systemd/$u" "$r/etc/systemd/system/"; done
mkdir -p "$r/etc/systemd/system/multi-user.target.wants"
for u in ota-agent.service ota-vm-setup.service ota-vm-report.service; do
  ln -s "../$u" "$r/etc/systemd/system/multi-user.target.wants/$u"
done
for s in ota-vm-report ota-vm-setup; do install -m 755 "$here/systemd/$s" "$r/usr/bin/$s"; done
ln -sf /lib/systemd/system/multi-user.target "$r/etc/systemd/system/default.target"
# The unit starts only once a signing key is in /etc/ota-agent/keys/.
mv "$r/etc/ota-agent/ota-signing.pub" "$r/etc/ota-agent/keys/ota-signing.pub"
sed -e 's|^data_dir = .*|data_dir = "/var/lib/ota-agent"|' \
  -e 's|/etc/ota-agent/ota-signing.pub|/etc/ota-agent/keys/ota-signing.pub|' \
  -e 's|^reboot_command = .*|reboot_command = "systemctl reboot"|' "$here/agent.toml" > "$r/etc/ota-agent/agent.toml"
cp "$here/systemd/journald.conf" "$r/etc/systemd/journald.conf.d/ota-vm.conf"
# The read-only slot: /var and /tmp are tmpfs; the data partition is
# mounted on /var/lib/ota-agent by ota-vm-setup.service (no udev, so no
# fstab line: a .mount unit would wait for a .device unit that never comes).
printf 'tmpfs /tmp tmpfs mode=1777,nosuid,nodev 0 0\ntmpfs /var tmpfs mode=0755 0 0\n' > "$r/etc/fstab"
printf 'root:x:0:0:root:/root:/bin/sh\nmessagebus:x:100:101::/nonexistent:/usr/sbin/nologin\nsystemd-network:x:998:998::/:/usr/sbin/nologin\n' > "$r/etc/passwd"
printf 'root:x:0:\nadm:x:4:\nutmp:x:43:\nmessagebus:x:101:\nsystemd-journal:x:102:\nsystemd-network:x:998:\n' > "$r/etc/group"
mkdir -p "$r/home" "$r/srv" "$r/root/.ssh"
ln -sf ../proc/self/mounts "$r/etc/mtab"
printf 'PRETTY_NAME="edge-ota test device (Debian 12 packages)"\nID=debian\nVERSION_ID="12"\n' > "$r/etc/os-release"
# A fixed machine id: no first-boot set-up on a read-only root.
echo 0e6a0b7e5d2c4c6f9a1b2c3d4e5f6a7b > "$r/etc/machine-id"
: > "$r/etc/hostname"; echo ota-vm > "$r/etc/hostname"
for u in getty.target systemd-logind.service systemd-user-sessions.service systemd-update-utmp.service \
  systemd-update-utmp-runlevel.service systemd-ask-password-wall.path systemd-ask-password-console.path \
  systemd-timesyncd.service systemd-networkd.service systemd-resolved.service systemd-tmpfiles-clean.timer \
  systemd-journal-flush.service systemd-hwdb-update.service systemd-sysusers.service systemd-firstboot.service \
  systemd-machine-id-commit.service ldconfig.service systemd-pstore.service systemd-random-seed.service \
  systemd-boot-system-token.service systemd-journal-catalog-update.service systemd-update-done.service \
  systemd-modules-load.service systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
  kmod-static-nodes.service systemd-remount-fs.service systemd-repart.service systemd-pcrphase.service \
  systemd-pcrphase-sysinit.service systemd-tmpfiles-setup-dev.service dev-hugepages.mount dev-mqueue.mount \
  sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount sys-fs-fuse-connections.mount \
  systemd-initctl.socket systemd-journald-audit.socket systemd-udevd-control.socket systemd-udevd-kernel.socket \
  cryptsetup.target integritysetup.target veritysetup.target remote-fs.target e2scrub_reap.service \
  modprobe@.service systemd-fsck-root.service systemd-rfkill.socket systemd-oomd.socket apt-daily.timer; do
  ln -sf /dev/null "$r/etc/systemd/system/$u"
done
