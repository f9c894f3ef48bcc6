#!/usr/bin/env python3
"""Soak load for a running `keycast serve` (started with KEYCAST_TEST_ROUTES=true): a steady
rate of async writes plus durable writes through /api/test/write, while the server's resident
memory (VmRSS) and its database + WAL size are sampled.

    soak.py BASE_URL PID DB_PATH SECONDS [RATE] [DURABLE_RATE] [SAMPLE_SECS]

Prints one JSON line per sample, then a summary line: RSS at the start, the middle and the
end, the growth over each half, and whether RSS levelled off (the second half grew by less
than a fifth of the first half's growth, or by under 2 MiB).
"""

import http.client
import json
import os
import sys
import threading
import time
import urllib.parse


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class Writer(threading.Thread):
    """Writes at `rate` per second on one keep-alive connection, on a fixed schedule."""

    def __init__(self, base, rate, durable, stop, prefix):
        super().__init__(daemon=True)
        self.url = urllib.parse.urlparse(base)
        self.rate, self.durable, self.stop, self.prefix = rate, durable, stop, prefix
        self.ok = self.failed = 0
        self.latencies = []

    def run(self):
        conn = None
        n = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += 1.0 / self.rate
            n += 1
            path = f"/api/test/write?key={self.prefix}{n}&durable={'true' if self.durable else 'false'}"
            started = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=30)
                conn.request("POST", path)
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
            except (OSError, http.client.HTTPException):
                self.failed += 1
                conn = None
            self.latencies.append(time.monotonic() - started)
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()  # behind: do not burst to catch up


def main():
    base, pid, db, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    rate = float(sys.argv[5]) if len(sys.argv) > 5 else 100.0
    durable_rate = float(sys.argv[6]) if len(sys.argv) > 6 else 1.0
    every = float(sys.argv[7]) if len(sys.argv) > 7 else 10.0
    stop = threading.Event()
    # Two async writers share the rate, so one slow answer does not stall the whole load.
    writers = [Writer(base, rate / 2, False, stop, f"a{i}-") for i in range(2)]
    writers.append(Writer(base, durable_rate, True, stop, "d-"))
    for w in writers:
        w.start()
    samples = []
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        sample = {
            "bench": "soak-sample",
            "t_s": round(elapsed, 1),
            "rss_kib": rss_kib(pid),
            "db_bytes": size(db),
            "wal_bytes": size(db + "-wal"),
            "async_ok": sum(w.ok for w in writers[:2]),
            "durable_ok": writers[2].ok,
            "failed": sum(w.failed for w in writers),
        }
        samples.append(sample)
        print(json.dumps(sample), flush=True)
        if elapsed >= seconds:
            break
        time.sleep(min(every, max(0.0, seconds - elapsed)))
    stop.set()
    for w in writers:
        w.join(timeout=35)
    first, mid, last = samples[0], samples[len(samples) // 2], samples[-1]
    grew_first = mid["rss_kib"] - first["rss_kib"]
    grew_second = last["rss_kib"] - mid["rss_kib"]
    durable = sorted(writers[2].latencies)
    print(
        json.dumps(
            {
                "bench": "soak",
                "seconds": round(last["t_s"], 1),
                "rate": rate,
                "durable_rate": durable_rate,
                "async_ok": last["async_ok"],
                "durable_ok": last["durable_ok"],
                "failed": sum(w.failed for w in writers),
                "rss_kib": {"start": first["rss_kib"], "middle": mid["rss_kib"], "end": last["rss_kib"],
                            "max": max(s["rss_kib"] for s in samples)},
                "rss_growth_kib": {"first_half": grew_first, "second_half": grew_second},
                "levels_off": grew_second < max(grew_first / 5, 2048),
                "db_bytes": last["db_bytes"],
                "wal_bytes_max": max(s["wal_bytes"] for s in samples),
                "durable_p50_ms": round(durable[len(durable) // 2] * 1000, 1) if durable else None,
                "durable_p99_ms": round(durable[int(len(durable) * 0.99)] * 1000, 1) if durable else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
