#!/usr/bin/env bash
# nutshell-vmm benchmarks on this host's /dev/kvm (printed, not asserted):
#   - process start to first KVM_RUN (p50/p99, as the VMM measures it from
#     main), and exec-to-exit of a VM whose guest resets at once;
#   - the same with a pod's devices (hybrid vsock, virtio-fs to a virtiofsd);
#   - VMM RSS with guest memory excluded (VmRSS - RssShmem: guest RAM is a
#     memfd, so every guest page the VMM or guest touched is shmem).
# Targets (issue 5): start to first KVM_RUN p50 <= 5 ms; RSS <= 8 MiB.
#
#   tools/bench/vmm.sh [runs]       (default 50; release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-50}
[[ -r /dev/kvm && -w /dev/kvm ]] || { echo "SKIP: /dev/kvm is not usable"; exit 0; }

cargo build -q --release -p nutshell-vmm
VMM=$PWD/target/release/nutshell-vmm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# 64-bit CPL3 code: `mov al, 0xfe; out 0x64, al` (i8042 reset), or spin.
printf '\xb0\xfe\xe6\x64\xeb\xfe' >"$work/reset.bin"
printf '\xeb\xfe' >"$work/spin.bin"

python3 - "$VMM" "$work" "$RUNS" <<'PY'
import os, re, statistics, subprocess, sys, time
vmm, work, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

first, wall = [], []
for _ in range(runs):
    t = time.perf_counter()
    r = subprocess.run([vmm, "--payload", f"{work}/reset.bin", "--memory-mib", "128",
                        "--serial", "none", "--print-timing"], capture_output=True, text=True)
    wall.append((time.perf_counter() - t) * 1000)
    if r.returncode != 0:
        sys.exit(f"nutshell-vmm failed ({r.returncode}): {r.stderr}")
    m = re.search(r"first KVM_RUN (\d+) us", r.stderr)
    first.append(int(m.group(1)) / 1000)

print(f"nutshell-vmm start to first KVM_RUN: p50 {pct(first, 50):.2f} ms, "
      f"p99 {pct(first, 99):.2f} ms over {runs} runs (target p50 <= 5 ms)")
print(f"nutshell-vmm exec to exit (guest resets at once): p50 {pct(wall, 50):.2f} ms, "
      f"p99 {pct(wall, 99):.2f} ms")

# The same with the devices a pod's VM has: hybrid vsock and virtio-fs, whose
# vhost-user handshake with virtiofsd happens before the first KVM_RUN.
virtiofsd = next((p for p in ("/usr/local/bin/virtiofsd", "/usr/libexec/virtiofsd")
                  if os.access(p, os.X_OK)), None)
if virtiofsd:
    share, sock = f"{work}/share", f"{work}/fs.sock"
    os.makedirs(share, exist_ok=True)
    dev = []
    for _ in range(min(runs, 20)):
        fsd = subprocess.Popen([virtiofsd, "--socket-path", sock, "--shared-dir", share,
                                "--cache", "never", "--rlimit-nofile", "0", "--sandbox", "none"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not os.path.exists(sock):
            time.sleep(0.002)
        r = subprocess.run([vmm, "--payload", f"{work}/reset.bin", "--memory-mib", "128",
                            "--serial", "none", "--print-timing", "--vsock", f"3,{work}/v.sock",
                            "--fs", f"nutshell,{sock}"], capture_output=True, text=True)
        fsd.kill(); fsd.wait()
        for f in (sock, f"{sock}.pid", f"{work}/v.sock"):
            if os.path.exists(f):
                os.unlink(f)
        if r.returncode != 0:
            sys.exit(f"nutshell-vmm with devices failed ({r.returncode}): {r.stderr}")
        dev.append(int(re.search(r"first KVM_RUN (\d+) us", r.stderr).group(1)) / 1000)
    print(f"nutshell-vmm start to first KVM_RUN with vsock + virtio-fs (virtiofsd handshake): "
          f"p50 {pct(dev, 50):.2f} ms, p99 {pct(dev, 99):.2f} ms over {len(dev)} runs")
else:
    print("SKIP: no virtiofsd: the figure with devices was not measured")

p = subprocess.Popen([vmm, "--payload", f"{work}/spin.bin", "--memory-mib", "256",
                      "--serial", "none", "--timeout-ms", "1500"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
st = dict(l.split(":", 1) for l in open(f"/proc/{p.pid}/status") if ":" in l)
kb = lambda k: int(st[k].split()[0])
p.wait()
rss, shmem = kb("VmRSS"), kb("RssShmem")
print(f"nutshell-vmm RSS without guest memory: {(rss - shmem) / 1024:.2f} MiB "
      f"(VmRSS {rss / 1024:.2f} MiB, guest shmem {shmem / 1024:.2f} MiB, 256 MiB guest; target <= 8 MiB)")
PY
