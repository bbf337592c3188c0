#!/usr/bin/env python3
"""Kubernetes probe for an mlx-cluster pod: `probe.py /livez`, `probe.py /readyz`, `probe.py /readyz --startup`.

Only rank 0 serves HTTP, but a StatefulSet gives every pod the same probes, so the probes
are exec probes that know which rank they run in:

* rank 0: GET http://127.0.0.1:<port><path>; exit 0 on HTTP 200, 1 otherwise.
* other ranks:
  - /livez and --startup: exit 0. The rank is the container's main process, and it ends
    itself when it cannot go on (lost peer, stalled collective: supervisor.collective_timeout_s),
    so a running container is a live rank. Probing rank 0 here would let one slow answer
    from rank 0 kill a worker, and with it the whole tensor-parallel group.
  - /readyz: rank 0's /readyz through the headless Service, so a worker pod shows Ready
    exactly when the group serves. No Service routes traffic to workers; this is for
    `kubectl get pods` and for anything that waits on pod readiness.

Standard library only: it runs every few seconds.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("/livez", "/readyz"):
        print("usage: probe.py /livez|/readyz [--startup]", file=sys.stderr)
        return 2
    path, startup = argv[0], "--startup" in argv[1:]
    hostname = (os.environ.get("HOSTNAME") or socket.gethostname()).split(".")[0]
    match = re.fullmatch(r"(.+)-(\d+)", hostname)
    if not match:
        print(f"hostname {hostname!r} has no StatefulSet ordinal", file=sys.stderr)
        return 1
    statefulset, rank = match.group(1), int(match.group(2))
    port = os.environ.get("MLX_CLUSTER_HTTP_PORT", "8000")
    if rank == 0:
        bind = os.environ.get("MLX_CLUSTER_HTTP_HOST", "0.0.0.0")
        host = "127.0.0.1" if bind in ("", "0.0.0.0", "::") else bind
    elif path == "/livez" or startup:
        return 0
    else:
        host = f"{statefulset}-0.{os.environ.get('MLX_CLUSTER_SERVICE', '')}"
    if ":" in host:
        host = f"[{host}]"
    request = urllib.request.Request(f"http://{host}:{port}{path}")
    keys = [k.strip() for k in os.environ.get("MLX_CLUSTER_API_KEY", "").split(",") if k.strip()]
    if keys:  # only needed with server.open_probes: false
        request.add_header("Authorization", f"Bearer {keys[0]}")
    try:
        with urllib.request.urlopen(request, timeout=float(os.environ.get("MLX_CLUSTER_PROBE_TIMEOUT_S", "3"))) as r:
            print(r.read(200).decode("utf-8", "replace"))
            return 0 if r.status == 200 else 1
    except urllib.error.HTTPError as e:
        print(f"{path}: HTTP {e.code} {e.read(200).decode('utf-8', 'replace')}")
        return 1
    except OSError as e:
        print(f"{path}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
