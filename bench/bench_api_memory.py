"""Peak memory of the service's HTTP API under a flood of large POSTs (SECURITY.md, "body floods").

Starts the API alone in a child process (handlers that count the items, as no store is needed to measure
the HTTP layer), sends N concurrent POST /items bodies of S MB each (items of --chars characters), and prints
each answer's status, the wall time and the child's peak RSS (ru_maxrss).

    .venv/bin/python -m bench.bench_api_memory [--posts 16] [--mb 31] [--chars 990]
    PYTHONPATH=/path/to/another/checkout .venv/bin/python -m bench.bench_api_memory   # e.g. the code before
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from collections import Counter

CHILD = r"""
import resource, sys
from freeal_stream.service.http_api import ApiHandlers, ApiServer
def add(items):
    return {"received": len(items), "added": len(items), "duplicates": 0}
server = ApiServer(ApiHandlers(add, lambda: {}, lambda since, limit: {"items": [], "next": since}))
print(server.start(), flush=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.stdin.read()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", type=int, default=16)
    ap.add_argument("--mb", type=float, default=31)
    ap.add_argument("--chars", type=int, default=990, help="characters of each item's text")
    args = ap.parse_args()
    # the child first: Linux carries a parent's peak RSS over fork and exec
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url = child.stdout.readline().strip()
    baseline_kb = int(child.stdout.readline())
    text = "x" * args.chars
    n = int(args.mb * 1e6 // (len(text) + 24))
    body = json.dumps({"items": [{"text": f"{i:08d} {text}"} for i in range(n)]}).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    statuses: list[int | str] = []

    def post() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        try:
            conn.request("POST", "/items", body, {"Content-Type": "application/json"})
            statuses.append(conn.getresponse().status)
        except OSError as exc:
            statuses.append(type(exc).__name__)
        finally:
            conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=post) for _ in range(args.posts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    child.stdin.close()
    peak_kb = int(child.stdout.readline())
    child.wait()
    print(
        f"{args.posts} concurrent POSTs of {len(body) / 1e6:.1f} MB ({n} items each): answers "
        f"{dict(Counter(statuses))}, {wall:.1f} s; API process RSS {baseline_kb / 1024:.0f} MB at start, "
        f"peak {peak_kb / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
