# The inside of `cargo xtask fresh-check` (see fresh.rs), run by bash in a private mount
# namespace, so every mount made here disappears when the run ends, however it ends.
# Parameters come from the environment: FRESH_BASE (the cached minbase root), FRESH_RUN (this
# run's directory), FRESH_SOURCE (the repository), FRESH_COMMIT, FRESH_RUSTUP_HOME,
# FRESH_CARGO_BIN (the rustup proxies), FRESH_COMMANDS ("demo ci", "demo" or "ci").
set -euo pipefail

mkdir -p "$FRESH_RUN/upper" "$FRESH_RUN/work" "$FRESH_RUN/merged"
# Canonical, so it compares equal to what /proc/<pid>/root says (TMPDIR may be a symlink).
root=$(realpath "$FRESH_RUN/merged")
mount -t overlay overlay \
    -o "lowerdir=$FRESH_BASE,upperdir=$FRESH_RUN/upper,workdir=$FRESH_RUN/work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# Certificate authorities this machine added locally (a TLS-intercepting proxy on the way to the
# package registries, say) belong to its network, not to what the project installs: trust them
# inside too, or cargo cannot reach crates.io from where the host can.
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" /usr/sbin/update-ca-certificates > /dev/null
    echo "fresh-check: trusting this machine's local CA certificates:" \
        $(cd /usr/local/share/ca-certificates && ls -- *.crt)
fi

bind_ro() {
    mkdir -p "$2"
    mount --bind "$1" "$2"
    mount -o remount,bind,ro "$2"
}
# The Rust toolchain as rustup installed it, read-only; CARGO_HOME starts empty (no crates, no
# cargo-fuzz), as on a new machine. The proxies are links to one rustup binary.
bind_ro "$FRESH_RUSTUP_HOME" "$root/root/.rustup"
mkdir -p "$root/root/.cargo/bin"
cp "$FRESH_CARGO_BIN/rustup" "$root/root/.cargo/bin/rustup"
for proxy in "$FRESH_CARGO_BIN"/*; do
    name=$(basename "$proxy")
    # A proxy is rustup itself under another name: a symlink or a hard link to it.
    if [ "$name" != rustup ] && [ "$proxy" -ef "$FRESH_CARGO_BIN/rustup" ]; then
        ln -sf rustup "$root/root/.cargo/bin/$name"
    fi
done
bind_ro "$FRESH_SOURCE" "$root/mnt/source"

inside() {
    chroot "$root" /usr/bin/env -i \
        HOME=/root USER=root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
        PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        /bin/bash -euo pipefail -c "$1"
}

# Ends what was started inside the root and is still running (a package's daemon, a test's
# leftover), by PID: only processes whose root directory is this run's root, which this run made.
end_leftovers() {
    local pid link found round
    # Rounds, bounded: a process may fork while the previous round ends its parent.
    for round in 1 2 3 4 5; do
        found=0
        for pid in /proc/[0-9]*; do
            link=$(readlink "$pid/root" 2>/dev/null) || continue
            if [ "$link" = "$root" ]; then
                found=1
                echo "fresh-check: ending leftover process ${pid#/proc/} (round $round): $(tr '\0' ' ' < "$pid/cmdline" 2>/dev/null)"
                kill -KILL "${pid#/proc/}" 2>/dev/null || true
            fi
        done
        [ "$found" -eq 0 ] && return 0
        sleep 0.2
    done
}
trap end_leftovers EXIT

echo "fresh-check: cloning $FRESH_COMMIT into /root/etcd-registry"
inside "git clone -q --no-local /mnt/source /root/etcd-registry && git -C /root/etcd-registry checkout -q --detach $FRESH_COMMIT"
inside "rustc --version && cargo --version"

summary=""
for command in $FRESH_COMMANDS; do
    inside "dpkg-query -W -f '\${Package}\n' | sort > /root/packages-before"
    echo
    echo "fresh-check: ==> cargo xtask $command"
    started=$(date +%s)
    status=0
    inside "cd /root/etcd-registry && cargo xtask $command < /dev/null" || status=$?
    took=$(( $(date +%s) - started ))
    inside "dpkg-query -W -f '\${Package}\n' | sort > /root/packages-after"
    added=$(inside "comm -13 /root/packages-before /root/packages-after | tr '\n' ' '")
    line="cargo xtask $command: exit $status after ${took}s; installed: ${added:-nothing}"
    summary="$summary$line"$'\n'
    echo "fresh-check: $line"
    if [ "$status" -ne 0 ]; then
        printf '\nfresh-check: summary\n%s' "$summary"
        exit "$status"
    fi
done
inside "ls /root/.cargo/bin | tr '\n' ' '" | sed 's/^/fresh-check: ~\/.cargo\/bin now holds: /'
echo
printf '\nfresh-check: summary\n%s' "$summary"
