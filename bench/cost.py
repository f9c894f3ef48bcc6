#!/usr/bin/env python3
"""The seed's yardstick, measured (issue 15): what a day of keycast costs in object storage.

Replays a compressed day - 1,000 users, 10,000 signatures and 100 new authorizations spread
over 24 simulated hours, activity log on - against several keycast set-ups at once, each
replicating to its own bucket on a moto S3 server through a counting proxy, and prints the
month's cost at GCS list prices:

  keycast            keycast's built-in replica, default settings
  keycast-cost       the cost profile of docs/OPERATIONS.md: activity written every 55 s,
                     compaction every 5 min / 1 h, lease TTL 300 s
  litestream         keycast without its replica (KEYCAST_REPLICA_URL=none), Litestream 0.5.17
                     with its shipped defaults replicating the same database file (the seed's
                     sidecar set-up)

Time is compressed by --factor (default 30: the day takes 48 minutes). Every interval that
drives object-store requests is divided by the same factor, for keycast and Litestream alike:
activity flushes, compaction levels, snapshots and their retention, L0 retention, background
verification, Litestream's monitor/sync/checkpoint and L0-retention-check intervals, and
keycast's lease TTL — in whole seconds, at least 1: the default 15 s becomes 1 s = 45 s
simulated at factor 45, so its renewals are under-counted; they are reported apart, with the
correction to the TTL simulated. keycast's internal timers (the lock budget, the hand-over
keeper's 1 s) cannot be compressed; they only act around uploads.

The proxy classifies S3 requests the way GCS bills their XML-API twins: class A = object
writes (PUT, POST, copy) and listings (GET on the bucket); class B = object reads (GET, HEAD);
DELETE free. Storage is the objects left at the end plus, with GCS's default soft delete,
every deleted byte for 7 days.

After the day: an hour (simulated) to settle, then an idle hour whose requests are counted
(target: zero).

  source /var/tmp/keycast-peers/env.sh
  python3 bench/cost.py --keycast target/release/keycast [--factor 30] [--out results.json]

The second benchmark of issue 15 is `python3 bench/cost.py --startup`: `keycast serve` from an
empty disk to ready, restoring a 100 MiB database from S3 (moto), five times.
"""
import argparse, base64, datetime, hashlib, http.client, http.server, json, os, random, re
import secrets, shutil, signal, socket, socketserver, statistics, subprocess, sys, tempfile
import threading, time, urllib.error, urllib.parse, urllib.request

# GCS list prices, Standard storage in a single region (us-central1, europe-west1), USD.
# From cloud.google.com/storage/pricing and /storage/pricing-examples (the stored copy the
# author read on this date; this machine cannot reach the live page).
PRICES = {
    "as_of": "2026-12-04",
    "source": "cloud.google.com/storage/pricing (Standard, us-central1)",
    "storage_per_gib_month": 0.020,
    "class_a_per_1000": 0.005,
    "class_b_per_1000": 0.0004,
    "soft_delete_days": 7,
}
DAY = 86400.0
PASSWORD = "correct horse battery staple"
REDIRECT = "http://127.0.0.1:9/callback"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the counting S3 proxy

class Counter:
    """What one set-up asked of its bucket."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events = []  # (monotonic time, class, kind)
        self.sizes = {}  # key -> bytes, from PUT bodies
        self.put_bytes = 0
        self.deleted = []  # (time, bytes)

    def window(self, start, end):
        with self.lock:
            out = {}
            for t, klass, kind in self.events:
                if start <= t < end:
                    out[(klass, kind)] = out.get((klass, kind), 0) + 1
            return out

    def deleted_bytes(self, start, end):
        with self.lock:
            return sum(b for t, b in self.deleted if start <= t < end)


def classify(method, path, query, headers, body):
    """(class, kind) of one S3 request: class A, B or free; kind names what it touched."""
    parts = path.lstrip("/").split("/", 1)
    key = parts[1] if len(parts) > 1 else ""
    kind = "lease" if key.endswith("keycast/lease.json") else ("ltx" if ".ltx" in key else "other")
    if method == "DELETE":
        return "free", kind
    if method == "POST" and "delete" in query:
        return "free", "batch-delete"
    if method in ("PUT", "POST"):
        return "A", kind
    if method == "GET" and not key:
        return "A", "list"
    return "B", kind


def make_proxy(upstream_port, counter):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def forward(self):
            body = self.body()
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            klass, kind = classify(self.command, url.path, query, self.headers, body)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            conn.request(self.command, self.path, body=body if body else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            key = url.path.lstrip("/")
            now = time.monotonic()
            with counter.lock:
                counter.events.append((now, klass, kind))
                if self.command == "PUT" and resp.status < 300:
                    counter.sizes[key] = len(body)
                    counter.put_bytes += len(body)
                elif self.command == "DELETE" and resp.status < 300:
                    counter.deleted.append((now, counter.sizes.pop(key, 0)))
                elif self.command == "POST" and "delete" in query and resp.status < 300:
                    bucket = key.split("/")[0]
                    for k in re.findall(rb"<Key>([^<]+)</Key>", body):
                        counter.deleted.append((now, counter.sizes.pop(f"{bucket}/{k.decode()}", 0)))
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            # A HEAD answer's length is the object's, not the (empty) body's.
            length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length)
            self.end_headers()
            try:
                if self.command != "HEAD":
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timed-out request); it was counted all the same
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------- processes

class Moto:
    def __init__(self, work):
        self.port = free_port()
        self.log = open(os.path.join(work, "moto.log"), "w")
        self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError("moto did not start")

    def bucket(self, name):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/{name}", method="PUT")
        urllib.request.urlopen(req, timeout=10).read()

    def objects(self, bucket, prefix):
        """(count, bytes) of the objects under prefix, straight from moto (not counted)."""
        count = size = 0
        token = None
        while True:
            q = {"list-type": "2", "prefix": prefix}
            if token:
                q["continuation-token"] = token
            body = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/{bucket}?{urllib.parse.urlencode(q)}", timeout=30).read().decode()
            for s in re.findall(r"<Size>(\d+)</Size>", body):
                count += 1
                size += int(s)
            m = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", body)
            if not m:
                return count, size
            token = m.group(1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


class Keycast:
    def __init__(self, binary, name, data, env, work):
        self.name, self.data = name, data
        self.log_path = os.path.join(work, f"{name}.log")
        full = {k: v for k, v in os.environ.items() if not k.startswith("KEYCAST_") and k not in ("PORT", "DATABASE_URL")}
        full.update({"PORT": "0", "KEYCAST_BIND": "127.0.0.1", "KEYCAST_DATA_DIR": data, "KEYCAST_LOG": "info",
                     "KEYCAST_EMBEDDED_RELAY_ADDR": "127.0.0.1:0", "KEYCAST_TEST_ROUTES": "true",
                     "KEYCAST_TRUSTED_PROXY_HOPS": "1", "KEYCAST_NIP46": "false", "KEYCAST_MASTER_KEY": base64.b64encode(bytes(range(32))).decode()})
        full.update(env)
        self.started = time.monotonic()
        self.proc = subprocess.Popen([binary, "serve"], env=full, stdout=subprocess.PIPE,
                                     stderr=open(self.log_path, "w"), text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        if not m:
            raise RuntimeError(f"{name}: no address; log {self.log_path}")
        self.base = m.group(1)

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(self.base + "/healthz/startup", timeout=5).status == 200:
                    return time.monotonic() - self.started
            except Exception:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; log {self.log_path}")
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} not ready; log {self.log_path}")

    def metrics(self):
        return urllib.request.urlopen(self.base + "/metrics", timeout=10).read().decode()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return self.proc.returncode


def metric(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- the API, as apps and users drive it

class Client:
    def __init__(self, base):
        self.base = base

    def call(self, method, path, body=None, ctype="application/json", cookie=None, token=None, ip=None):
        data = None
        if body is not None:
            data = json.dumps(body).encode() if ctype == "application/json" else body.encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", ctype)
        if cookie:
            req.add_header("Cookie", cookie)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        if ip:
            # One address per simulated user (KEYCAST_TRUSTED_PROXY_HOPS=1): the per-client
            # rate limits apply to each user, not to the benchmark as a whole.
            req.add_header("X-Forwarded-For", ip)
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=60) as r:
                return r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read().decode()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def grant(client, cookie, ip):
    """The OAuth 2.0 + PKCE consent and token exchange: one new authorization."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = urllib.parse.urlencode({"client_id": "bench-app", "redirect_uri": REDIRECT, "response_type": "code",
                                    "scope": "policy:social", "state": "s", "code_challenge": challenge,
                                    "code_challenge_method": "S256"})
    status, _, page = client.call("GET", "/api/oauth/authorize?" + query, cookie=cookie, ip=ip)
    assert status == 200, (status, page[:300])
    fields = dict(urllib.parse.parse_qsl(query))
    fields["csrf"] = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    fields["decision"] = "approve"
    status, headers, body = client.call("POST", "/api/oauth/authorize", urllib.parse.urlencode(fields),
                                        "application/x-www-form-urlencoded", cookie=cookie, ip=ip)
    assert status == 302, (status, body[:300])
    code = urllib.parse.parse_qs(urllib.parse.urlparse(headers["Location"]).query)["code"][0]
    status, _, body = client.call("POST", "/api/oauth/token", {"grant_type": "authorization_code", "code": code,
                                  "client_id": "bench-app", "redirect_uri": REDIRECT, "code_verifier": verifier}, ip=ip)
    assert status == 200, (status, body[:300])
    return json.loads(body)["access_token"]


def setup_users(client, n):
    """n verified users, each with one authorization: the state the day starts from."""
    users = []
    for i in range(n):
        ip = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
        email = f"user{i}@bench.example"
        status, headers, body = client.call("POST", "/api/auth/register", {"email": email, "password": PASSWORD}, ip=ip)
        assert status == 201, (status, body)
        cookie = headers["Set-Cookie"].split(";")[0]
        status, _, outbox = client.call("GET", "/api/test/outbox")
        token = next(m["token"] for m in reversed(json.loads(outbox)["messages"]) if m["to"] == email and m["purpose"] == "verify_email")
        status, _, body = client.call("POST", "/api/auth/verify-email", {"token": token, "password": PASSWORD}, ip=ip)
        assert status == 200, (status, body)
        users.append({"ip": ip, "cookie": cookie, "token": grant(client, cookie, ip)})
        if (i + 1) % 100 == 0:
            log(f"setup: {i + 1} users")
    return users


def schedule(users, signatures, grants, seed):
    """The day: (simulated second, kind, user index), Poisson-like (uniform times)."""
    rng = random.Random(seed)
    events = [(rng.uniform(0, DAY), "sign", rng.randrange(len(users))) for _ in range(signatures)]
    events += [(rng.uniform(0, DAY), "grant", rng.randrange(len(users))) for _ in range(grants)]
    return sorted(events)


# ---------------------------------------------------------------- the day

def litestream_config(path, db, port, bucket, factor):
    d = lambda secs: f"{max(1, round(secs * 1000 / factor))}ms"
    with open(path, "w") as f:
        f.write(f"""access-key-id: test
secret-access-key: test
levels:
  - interval: {d(30)}
  - interval: {d(300)}
  - interval: {d(3600)}
snapshot:
  interval: {d(86400)}
  retention: {d(86400)}
l0-retention: {d(300)}
l0-retention-check-interval: {d(15)}
dbs:
  - path: {db}
    monitor-interval: {d(1)}
    checkpoint-interval: {d(60)}
    replica:
      url: s3://{bucket}/litestream
      endpoint: http://127.0.0.1:{port}
      region: us-east-1
      force-path-style: true
      sync-interval: {d(1)}
""")


def keycast_env(proxy_port, bucket, factor, flush_sim_secs, levels_sim, lease_ttl_sim):
    s = lambda secs: str(max(1, round(secs / factor)))
    return {
        "KEYCAST_REPLICA_URL": f"s3://{bucket}/keycast",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}",
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
        "KEYCAST_ACTIVITY_FLUSH_MS": str(max(10, round(flush_sim_secs * 1000 / factor))),
        "KEYCAST_REPLICA_COMPACTION_LEVELS": ",".join(s(x) for x in levels_sim),
        "KEYCAST_REPLICA_SNAPSHOT_INTERVAL_SECS": s(86400),
        "KEYCAST_REPLICA_SNAPSHOT_RETENTION_SECS": s(86400),
        "KEYCAST_REPLICA_L0_RETENTION_SECS": s(300),
        "KEYCAST_REPLICA_VERIFY_INTERVAL_SECS": s(3600),
        "KEYCAST_REPLICA_LEASE_TTL_SECS": s(lease_ttl_sim),
        "KEYCAST_REPLICA_LEASE_WAIT_SECS": "5",
    }


def cost(a_per_day, b_per_day, gib_month):
    month = 30
    return (a_per_day * month * PRICES["class_a_per_1000"] / 1000
            + b_per_day * month * PRICES["class_b_per_1000"] / 1000
            + gib_month * PRICES["storage_per_gib_month"])


def run_day(args):
    work = tempfile.mkdtemp(prefix="keycast-cost-", dir=args.work)
    log("work dir", work)
    moto = Moto(work)
    factor = args.factor
    try:
        # 1. The state the day starts from, built once on a keycast without a replica.
        seed_dir = os.path.join(work, "seed")
        seed = Keycast(args.keycast, "seed", seed_dir, {"KEYCAST_REPLICA_URL": "none"}, work)
        seed.wait_ready()
        users = setup_users(Client(seed.base), args.users)
        assert seed.stop() == 0
        with open(os.path.join(work, "users.json"), "w") as f:
            json.dump(users, f)

        # 2. The set-ups, each on a copy of that database, each with its own bucket and proxy.
        setups = {}
        for name in ["keycast", "keycast-cost", "litestream"]:
            data = os.path.join(work, name)
            os.makedirs(data)
            shutil.copy(os.path.join(seed_dir, "keycast.db"), os.path.join(data, "keycast.db"))
            bucket = f"{name}-{secrets.token_hex(3)}"
            moto.bucket(bucket)
            counter = Counter()
            proxy = make_proxy(moto.port, counter)
            port = proxy.server_address[1]
            if name == "keycast":
                env = keycast_env(port, bucket, factor, 1, [10, 300, 3600], 15)
            elif name == "keycast-cost":
                env = keycast_env(port, bucket, factor, args.cost_flush, [300, 3600], args.cost_lease_ttl)
            else:
                env = {"KEYCAST_REPLICA_URL": "none", "KEYCAST_ACTIVITY_FLUSH_MS": str(max(10, round(1000 / factor)))}
            setups[name] = {"data": data, "bucket": bucket, "counter": counter, "proxy": proxy, "env": env}
        for name, s in setups.items():
            s["server"] = Keycast(args.keycast, name, s["data"], s["env"], work)
            s["server"].wait_ready()
            if name == "litestream":
                cfg = os.path.join(work, "litestream.yml")
                litestream_config(cfg, os.path.join(s["data"], "keycast.db"), s["proxy"].server_address[1], s["bucket"], factor)
                env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
                s["litestream"] = subprocess.Popen(["litestream", "replicate", "-config", cfg], env=env,
                                                   stdout=open(os.path.join(work, "litestream.log"), "w"), stderr=subprocess.STDOUT)
        # Let the initial uploads (full images) and their first compactions finish.
        settle = 3600 / factor
        log(f"settling {settle:.0f} s before the day")
        time.sleep(settle)

        # 3. The day.
        events = schedule(users, args.signatures, args.grants, args.seed)
        log(f"the day: {len(events)} events over {DAY / factor:.0f} s")
        lag = {name: [] for name in setups}
        day_start = time.monotonic()
        errors = {name: 0 for name in setups}
        stop_sampling = threading.Event()

        def sample():
            while not stop_sampling.wait(1.0):
                for name, s in setups.items():
                    if name != "litestream":
                        try:
                            lag[name].append(metric(s["server"].metrics(), "keycast_replica_lag_seconds"))
                        except Exception:
                            pass
        threading.Thread(target=sample, daemon=True).start()

        def send(name, s, kind, user):
            c = Client(s["server"].base)
            try:
                if kind == "sign":
                    tmpl = {"kind": 1, "content": f"note {secrets.token_hex(8)}", "tags": [], "created_at": int(time.time())}
                    status, _, body = c.call("POST", "/api/nostr", {"method": "sign_event", "params": [tmpl]}, token=user["token"], ip=user["ip"])
                    ok = status == 200
                else:
                    grant(c, user["cookie"], user["ip"])
                    ok = True
            except Exception as e:  # noqa: BLE001 - counted and reported
                log(name, kind, "failed:", e)
                ok = False
            if not ok:
                errors[name] += 1

        for at, kind, u in events:
            delay = day_start + at / factor - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            threads = [threading.Thread(target=send, args=(n, s, kind, users[u])) for n, s in setups.items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        day_end = max(time.monotonic(), day_start + DAY / factor)
        time.sleep(max(0, day_start + DAY / factor - time.monotonic()))
        stop_sampling.set()
        log("day done; settling an hour, then an idle hour")
        time.sleep(3600 / factor)
        idle_start = time.monotonic()
        time.sleep(3600 / factor)
        idle_end = time.monotonic()

        # 4. Results.
        results = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "factor": factor, "users": args.users, "signatures": args.signatures, "grants": args.grants,
                   "prices": PRICES, "setups": {}}
        for name, s in setups.items():
            counts = s["counter"].window(day_start, day_end)
            idle = s["counter"].window(idle_start, idle_end)
            a = sum(v for (k, _), v in counts.items() if k == "A")
            b = sum(v for (k, _), v in counts.items() if k == "B")
            lease_a = counts.get(("A", "lease"), 0)
            lease_b = counts.get(("B", "lease"), 0)
            objects, stored = moto.objects(s["bucket"], "")
            deleted = s["counter"].deleted_bytes(day_start, day_end)
            soft_deleted = deleted * PRICES["soft_delete_days"]  # byte-days per day kept
            gib_month = (stored + soft_deleted) / 2**30
            # Lease renewals scale with time: the run's TTL (whole seconds) covered
            # TTL * factor simulated seconds, not the TTL simulated, so a real day renews
            # that much more (or less) often.
            lease_sim = 15 if name == "keycast" else args.cost_lease_ttl
            lease_run = max(1, round(lease_sim / factor))
            lease_scale = lease_run * factor / lease_sim if name != "litestream" else 1.0
            a_corrected = a + lease_a * (lease_scale - 1)
            b_corrected = b + lease_b * (lease_scale - 1)
            entry = {
                "class_a": a, "class_b": b, "by_kind": {f"{k}/{kind}": v for (k, kind), v in sorted(counts.items())},
                "lease_class_a": lease_a, "lease_class_b": lease_b,
                "class_a_lease_corrected": a_corrected, "class_b_lease_corrected": b_corrected,
                "objects_at_end": objects, "bytes_at_end": stored, "bytes_deleted_in_day": deleted,
                "bytes_put_total": s["counter"].put_bytes,
                "storage_gib_month": gib_month,
                "idle_requests": sum(idle.values()), "idle_by_kind": {f"{k}/{kind}": v for (k, kind), v in idle.items()},
                "failed_events": errors[name],
                "month_usd": cost(a, b, gib_month),
                "month_usd_lease_corrected": cost(a_corrected, b_corrected, gib_month),
                "lag_max_s": max(lag[name]) if lag[name] else None,
                "env": s["env"],
            }
            if name != "litestream":
                m = s["server"].metrics()
                entry["keycast_requests_total"] = metric(m, "keycast_replica_requests_total")
            results["setups"][name] = entry
        return results
    finally:
        for name, s in locals().get("setups", {}).items():
            if "litestream" in s:
                s["litestream"].send_signal(signal.SIGTERM)
                try:
                    s["litestream"].wait(timeout=30)
                except subprocess.TimeoutExpired:
                    s["litestream"].kill()
            if "server" in s:
                try:
                    s["server"].stop()
                except Exception:
                    s["server"].proc.kill()
        moto.stop()


def run_startup(args):
    """`keycast serve` from an empty disk to ready, restoring a 100 MiB database from S3."""
    work = tempfile.mkdtemp(prefix="keycast-startup-", dir=args.work)
    moto = Moto(work)
    try:
        bucket = f"startup-{secrets.token_hex(3)}"
        moto.bucket(bucket)
        env = {"KEYCAST_REPLICA_URL": f"s3://{bucket}/keycast", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto.port}",
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
        # A keycast database grown to 100 MiB (random, incompressible rows in a table of its
        # own: the restore's cost is in bytes and pages, not in which table holds them).
        data = os.path.join(work, "source")
        first = Keycast(args.keycast, "source", data, {"KEYCAST_REPLICA_URL": "none"}, work)
        first.wait_ready()
        first.stop()
        db = os.path.join(data, "keycast.db")
        subprocess.run(["sqlite3", db, "CREATE TABLE bench_filler(id INTEGER PRIMARY KEY, v BLOB);"
                        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 26000) "
                        "INSERT INTO bench_filler(v) SELECT randomblob(4000) FROM n;"], check=True)
        size = os.path.getsize(db)
        log(f"source database {size / 2**20:.1f} MiB")
        ship = Keycast(args.keycast, "ship", data, env, work)
        ship.wait_ready()
        assert ship.stop() == 0
        runs = []
        for i in range(args.runs):
            fresh = os.path.join(work, f"empty-{i}")
            k = Keycast(args.keycast, f"restore-{i}", fresh, env, work)
            ready = k.wait_ready()
            restored = os.path.getsize(os.path.join(fresh, "keycast.db"))
            assert k.stop() == 0
            shutil.rmtree(fresh)
            runs.append(ready)
            log(f"run {i + 1}: ready after {ready:.3f} s ({restored / 2**20:.1f} MiB restored)")
        return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "database_mib": size / 2**20, "runs_s": runs, "median_s": statistics.median(runs),
                "load_average": os.getloadavg()}
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keycast", required=True, help="the keycast binary (a release build)")
    p.add_argument("--factor", type=float, default=30.0, help="simulated seconds per real second")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--signatures", type=int, default=10000)
    p.add_argument("--grants", type=int, default=100)
    p.add_argument("--cost-flush", type=float, default=55.0, help="keycast-cost's activity flush, simulated seconds")
    p.add_argument("--cost-lease-ttl", type=float, default=300.0, help="keycast-cost's lease TTL, simulated seconds")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--work", default="/var/tmp")
    p.add_argument("--out", help="write the JSON results here too")
    p.add_argument("--startup", action="store_true", help="measure start-up from an empty disk instead")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    results = run_startup(args) if args.startup else run_day(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
