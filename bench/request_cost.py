#!/usr/bin/env python3
"""API server CPU per request, by kind of request: what a cold reconcile's dry-runs cost
beside its applies, and what its per-app writes of state cost (a Lease taken and handed
back, the state ConfigMap created with the run's intent, then merge-patched with its record;
sizes like those of a 20-object app) (BENCHMARKS.md, fleet section).

Needs the test control plane of tests/cluster/up.sh running on this machine (its API server
and etcd are found by process name; the admin token and port are the ones up.sh writes).
Creates a namespace `request-cost-<time>`, sends N requests of each kind 16 at a time, and
prints the API server's and etcd's CPU milliseconds per request (from /proc) for each kind;
deletes the namespace at the end. Standard library only.

Usage: python3 bench/request_cost.py [N]   (N defaults to 3000)
"""

import http.client
import json
import os
import queue
import ssl
import sys
import threading
import time

CLUSTER_DIR = os.environ.get("DRIFTLESS_CLUSTER_DIR", "/tmp/driftless-cluster")
PORT = 16443
NS = f"request-cost-{int(time.time())}"
TICKS = os.sysconf("SC_CLK_TCK")
CTX = ssl._create_unverified_context()  # the test control plane's own CA; local only


def pid_of(comm):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == comm:
                    return int(pid)
        except OSError:
            continue
    sys.exit(f"request_cost: no {comm} process on this machine (start tests/cluster/up.sh)")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def request(conn, token, method, path, body=None, ctype="application/json"):
    headers = {"Authorization": "Bearer " + token, "Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = ctype
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status


def measure(label, calls, expected, token, apiserver, etcd, threads=16):
    work = queue.Queue()
    for call in calls:
        work.put(call)
    codes = {}
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPSConnection("127.0.0.1", PORT, context=CTX)
        while True:
            try:
                call = work.get_nowait()
            except queue.Empty:
                return
            status = request(conn, token, *call)
            with lock:
                codes[status] = codes.get(status, 0) + 1

    a0, e0, t0 = cpu_seconds(apiserver), cpu_seconds(etcd), time.time()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    a1, e1, t1 = cpu_seconds(apiserver), cpu_seconds(etcd), time.time()
    n = len(calls)
    if set(codes) != {expected}:
        sys.exit(f"request_cost: {label}: answers {codes}, expected only HTTP {expected}")
    print(
        f"{label:44s} API server {(a1 - a0) * 1000 / n:.3f} ms/request, "
        f"etcd {(e1 - e0) * 1000 / n:.3f} ms/request, {t1 - t0:.1f} s wall, answers {codes}",
        flush=True,
    )


def config_map(name):
    labels = {
        "tier": "backend",
        "app.kubernetes.io/managed-by": "driftless",
        "driftless.dev/app": "a1",
    }
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "labels": labels},
            "data": {"key": "value-1", "endpoint": "http://a1-svc0:80/v1"},
        }
    )


def lease(name, holder):
    spec = {"leaseDurationSeconds": 15, "renewTime": "2026-12-05T08:00:00.000000Z"}
    if holder:
        spec["holderIdentity"] = holder
    return json.dumps({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "driftless"}},
        "spec": spec,
    })


def state_map(name, data_bytes):
    """A state ConfigMap about as big as a 20-object app's intent: `data_bytes` of text (a
    20-object app's state holds 1.6 KB of record; 2.6 KB with its kept manifests)."""
    return json.dumps({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "driftless", "driftless.dev/state-of": name},
            "annotations": {"driftless.dev/inputs": "[]"},
        },
        "data": {"state": "x" * data_bytes},
    })


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    with open(os.path.join(CLUSTER_DIR, "admin.token")) as f:
        token = f.read().strip()
    apiserver, etcd = pid_of("kube-apiserver"), pid_of("etcd")
    conn = http.client.HTTPSConnection("127.0.0.1", PORT, context=CTX)
    namespace = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    status = request(conn, token, "POST", "/api/v1/namespaces", namespace)
    if status != 201:
        sys.exit(f"request_cost: creating namespace {NS}: HTTP {status}")
    base = f"/api/v1/namespaces/{NS}/configmaps"
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
    apply = "application/apply-patch+yaml"
    merge = "application/merge-patch+json"
    kinds = [
        ("server-side apply, dry-run, a creation", 201,
         [("PATCH", f"{base}/d-{i}?fieldManager=driftless&dryRun=All",
           config_map(f"d-{i}"), apply) for i in range(n)]),
        ("server-side apply, a creation", 201,
         [("PATCH", f"{base}/a-{i}?fieldManager=driftless",
           config_map(f"a-{i}"), apply) for i in range(n)]),
        ("POST ?dryRun=All, a creation", 201,
         [("POST", f"{base}?dryRun=All&fieldManager=driftless",
           config_map(f"p-{i}")) for i in range(n)]),
        ("merge patch of an existing object", 200,
         [("PATCH", f"{base}/a-{i}", json.dumps({"data": {"k2": "v"}}), merge)
          for i in range(n)]),
        ("ConfigMap creation, 1.6 KB (a state's intent)", 201,
         [("POST", base, state_map(f"s-{i}", 1600)) for i in range(n)]),
        ("merge patch, 2.6 KB (a state's record)", 200,
         [("PATCH", f"{base}/s-{i}", json.dumps({"data": {"state": "y" * 2600}}), merge)
          for i in range(n)]),
        ("Lease creation (a run's lease taken)", 201,
         [("POST", leases, lease(f"l-{i}", "replica-1")) for i in range(n)]),
        # driftless hands a lease back with a replace at the resourceVersion it holds; a
        # merge patch of the same change stands in for it here.
        ("Lease handed back (merge patch)", 200,
         [("PATCH", f"{leases}/l-{i}", json.dumps({"spec": {"holderIdentity": None}}), merge)
          for i in range(n)]),
        ("GET of a missing object (404)", 404,
         [("GET", f"{base}/missing-{i}") for i in range(n)]),
    ]
    try:
        for label, expected, calls in kinds:
            measure(label, calls, expected, token, apiserver, etcd)
    finally:
        request(conn, token, "DELETE", f"/api/v1/namespaces/{NS}")


if __name__ == "__main__":
    main()
