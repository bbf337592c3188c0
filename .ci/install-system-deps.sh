#!/usr/bin/env bash
# Install the Debian packages the test suite needs, if they are missing.
#
#   openssh-server  sshd, run inside network namespaces by tests/netns.py
#   openssh-client  ssh-keygen, for the test host and client keys
#   iproute2        `ip netns`, `ip link` for the namespaces, veths and bridge
#   chromium        the headless browser tests/test_dashboard.py drives (the dashboard, playground)
#   chromium-driver chromedriver, through which selenium drives it
#   libopenblas0-pthread  an optimized BLAS: cluster.cpu_blas: auto loads it for mlx's CPU
#                   matmuls (mlx's Linux wheel bundles the reference BLAS), in ranks and tests alike
#
# Idempotent and quiet: does nothing when everything is there, runs `apt-get update`
# only when something has to be installed. On a machine without apt, or when not root,
# it prints a note and exits 0: the tests that need these skip themselves.
set -euo pipefail

# package -> a file that shows it is installed
declare -A wanted=(
  [openssh-server]=/usr/sbin/sshd
  [openssh-client]=/usr/bin/ssh-keygen
  [iproute2]=/usr/sbin/ip
  [chromium]=/usr/bin/chromium
  [chromium-driver]=/usr/bin/chromedriver
  [libopenblas0-pthread]=/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0
)

missing=()
for pkg in "${!wanted[@]}"; do
  [[ -e "${wanted[$pkg]}" ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "install-system-deps: not root, not installing ${missing[*]} (the SSH/netns and browser tests will skip)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: no apt-get here, not installing ${missing[*]} (the SSH/netns and browser tests will skip)"
  exit 0
fi

# Installing openssh-server would otherwise start a system sshd listening on port 22;
# the tests run their own sshd inside namespaces, so keep the service from starting.
# Only add the policy file when there is none, and remove only the one we added.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  added_policy=1
fi
cleanup() { if [[ $added_policy -eq 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-system-deps: done"
