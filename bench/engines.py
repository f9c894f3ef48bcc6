#!/usr/bin/env python3
"""HTTP RPC `sign_event` on SQLite vs PostgreSQL (one instance each), and one vs two
instances on PostgreSQL, in one run (issue 13). For each: wrk with 50 connections in all
(split evenly over the instances) after a warm-up, and what predicts scaling on a machine
whose two cores are shared by everything: keycast's and PostgreSQL's CPU time per request
and database transactions per request.

    source /var/tmp/keycast-peers/env.sh   # nothing needed from it but PATH
    python3 bench/engines.py [--seconds 15] [--keycast target/release/keycast]

Prints one JSON line per scenario (with each instance's own wrk figures). ENGINES_LOG sets
the servers' KEYCAST_LOG (default warn); ENGINES_KEEP_LOGS=DIR copies their logs there when a
scenario had errors or a p99 past 100 ms. Needs wrk, psql and PostgreSQL's server binaries
(scripts/postgres.sh starts a throwaway server)."""
import argparse, base64, collections, json, os, socket, subprocess, sys, tempfile, threading, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except FileNotFoundError:
            pass
    return total / TICK


def postgres_pids(data_dir):
    master = int(open(os.path.join(data_dir, "postmaster.pid")).readline())
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout.split()
    return [master] + [int(p) for p in children]


class WaitSampler:
    """Samples pg_stat_activity every 50 ms while wrk runs: what keycast's backends were
    doing (active or idle in transaction, and the wait event if any), so a stall names its
    cause from PostgreSQL's side. Counts samples per (state, wait event, statement start)."""

    def __init__(self, url):
        self.url, self.counts, self.stop_flag = url, collections.Counter(), threading.Event()
        self.longest = {}
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        sql = ("SELECT state, coalesce(wait_event_type || ':' || wait_event, 'cpu'), left(query, 40), "
               "extract(epoch FROM now() - xact_start) FROM pg_stat_activity WHERE application_name = 'keycast' "
               "AND state <> 'idle' AND pid <> pg_backend_pid()")
        proc = subprocess.Popen(["psql", "-AtqX", "-F", "\t", self.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        while not self.stop_flag.is_set():
            proc.stdin.write(sql + ";\nSELECT 'END';\n")
            proc.stdin.flush()
            for line in iter(proc.stdout.readline, ""):
                line = line.rstrip("\n")
                if line == "END":
                    break
                state, wait, query, age = (line.split("\t") + ["", "", "", ""])[:4]
                key = f"{state} | {wait} | {query}"
                self.counts[key] += 1
                try:
                    self.longest[key] = max(self.longest.get(key, 0), float(age or 0))
                except ValueError:
                    pass
            time.sleep(0.05)
        proc.stdin.close()
        proc.wait(timeout=10)

    def finish(self):
        self.stop_flag.set()
        self.thread.join(timeout=10)
        return [{"what": k, "samples": n, "longest_xact_s": round(self.longest.get(k, 0), 2)}
                for k, n in self.counts.most_common(12)]


def psql(url, sql):
    return subprocess.run(["psql", "-AtqX", url, "-c", sql], capture_output=True, text=True, check=True).stdout.strip()


class Instance:
    def __init__(self, keycast, work, name, env):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full = {k: v for k, v in os.environ.items() if not k.startswith("KEYCAST_") and k != "DATABASE_URL"}
        full.update(PORT=str(self.port), KEYCAST_BIND="127.0.0.1", KEYCAST_DATA_DIR=os.path.join(work, name),
                    KEYCAST_LOG=os.environ.get("ENGINES_LOG", "warn"), KEYCAST_EMBEDDED_RELAY_ADDR="127.0.0.1:0", KEYCAST_TEST_ROUTES="true",
                    **env)
        self.log = open(os.path.join(work, f"{name}.log"), "w")
        self.proc = subprocess.Popen([keycast, "serve"], env=full, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(self.base + "/healthz/ready") as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                sys.exit(f"{name} did not start; see {self.log.name}")
            time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def wrk(instances, token, seconds, connections=50):
    env = dict(os.environ, TOKEN=token)
    per = connections // len(instances)
    # Two client threads in all, whatever the number of instances: wrk's own CPU is part of
    # the load on the shared cores, so it must be the same in every scenario.
    threads = max(1, 2 // len(instances))
    runs = [subprocess.Popen(["wrk", f"-t{threads}", f"-c{per}", f"-d{seconds}s", "--latency", "-s", "bench/rpc/sign.lua",
                              i.base + "/api/nostr"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for i in instances]
    results = []
    for run in runs:
        out, _ = run.communicate(timeout=seconds + 60)
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("{"))))
    return results


def scenario(name, instances, token, seconds, pg=None):
    wrk(instances, token, 3)  # warm-up: caches, connections
    pids = [i.proc.pid for i in instances]
    before = cpu_seconds(pids)
    pg_before = cpu_seconds(postgres_pids(pg["data"])) if pg else 0
    xacts_before = int(psql(pg["url"], pg["xacts"])) if pg else 0
    sampler = WaitSampler(pg["url"]) if pg else None
    results = wrk(instances, token, seconds)
    waits = sampler.finish() if sampler else None
    requests = sum(r["requests"] for r in results)
    out = {
        "scenario": name,
        "instances": len(instances),
        "requests": requests,
        "req_per_s": round(sum(r["req_per_s"] for r in results)),
        "p50_ms": max(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "errors": sum(r["errors"] for r in results),
        # Of which: answers other than 2xx/3xx, requests past wrk's 2 s timeout, socket errors.
        "non_2xx": sum(r.get("non_2xx", 0) for r in results),
        "timeouts": sum(r.get("timeouts", 0) for r in results),
        "socket_errors": sum(r.get("socket_errors", 0) for r in results),
        "keycast_cpu_us_per_req": round((cpu_seconds(pids) - before) / requests * 1e6, 1),
        # Each instance's own wrk: a stall on one instance shows here, not in the sums.
        "per_instance": [{k: r.get(k) for k in ("requests", "req_per_s", "p50_ms", "p99_ms", "max_ms", "non_2xx",
                                                "timeouts", "socket_errors")} for r in results],
    }
    troubled = out["errors"] or out["p99_ms"] > 100
    if troubled and os.environ.get("ENGINES_KEEP_LOGS"):
        # Keep the servers' logs of a troubled scenario for a look at what they did.
        keep = os.environ["ENGINES_KEEP_LOGS"]
        os.makedirs(keep, exist_ok=True)
        for i in instances:
            i.log.flush()
            subprocess.run(["cp", i.log.name, os.path.join(keep, f"{int(time.time())}-{os.path.basename(i.log.name)}")])
        out["logs_kept_in"] = keep
    if pg:
        out["postgres_cpu_us_per_req"] = round((cpu_seconds(postgres_pids(pg["data"])) - pg_before) / requests * 1e6, 1)
        out["db_transactions_per_req"] = round((int(psql(pg["url"], pg["xacts"])) - xacts_before) / requests, 4)
        # What keycast's PostgreSQL backends were doing, sampled every 50 ms during the run.
        out["pg_activity_samples"] = waits
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--keycast", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release/keycast"))
    parser.add_argument("--only", default="sqlite,pg1,pg2", help="scenarios to run, of sqlite,pg1,pg2")
    args = parser.parse_args()
    only = args.only.split(",")
    work = tempfile.mkdtemp(prefix="keycast-engines-", dir="/var/tmp")
    os.chmod(work, 0o755)  # as root, the server runs as postgres and must reach its directory
    pg_dir = os.path.join(work, "pg")
    admin = subprocess.run([os.path.join(ROOT, "scripts/postgres.sh"), "start", pg_dir], capture_output=True, text=True,
                           check=True).stdout.strip()
    # PostgreSQL's own account of a stall: statements over 100 ms (ENGINES_PG_LOG_MS), lock waits (checked after
    # 100 ms), checkpoints and autovacuum; the log is copied next to the servers' logs.
    log_ms = os.environ.get("ENGINES_PG_LOG_MS", "100")  # 0: every statement, with its time
    for setting in (f"log_min_duration_statement = {log_ms}", "log_line_prefix = '%m [%p] %a '", "log_lock_waits = on", "deadlock_timeout = 100",
                    "log_checkpoints = on", "log_autovacuum_min_duration = 0"):
        psql(admin, f"ALTER SYSTEM SET {setting}")
    psql(admin, "SELECT pg_reload_conf()")
    master = base64.b64encode(os.urandom(32)).decode()
    running = []
    try:
        def start(name, env):
            instance = Instance(args.keycast, work, name, dict(env, KEYCAST_MASTER_KEY=master))
            running.append(instance)
            return instance

        def token_of(instance):
            return subprocess.run([sys.executable, "bench/rpc/flow.py", instance.base], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip()

        if "sqlite" in only:
            lite = start("sqlite", {"KEYCAST_REPLICA_URL": f"file://{work}/replica"})
            scenario("sqlite, one instance", [lite], token_of(lite), args.seconds)
            lite.stop()
            running.remove(lite)

        for n in [n for n in (1, 2) if f"pg{n}" in only]:
            db = f"bench{n}"
            psql(admin, f"CREATE DATABASE {db}")
            url = admin.rsplit("/", 1)[0] + "/" + db
            pg = {"url": url, "data": os.path.join(pg_dir, "data"),
                  "xacts": f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{db}'"}
            instances = [start(f"pg{n}-{i}", {"DATABASE_URL": url}) for i in range(n)]
            token = token_of(instances[0])
            scenario(f"postgresql, {n} instance{'s' if n > 1 else ''}", instances, token, args.seconds, pg)
            for i in instances:
                i.stop()
                running.remove(i)
    finally:
        for i in running:
            i.stop()
        if os.environ.get("ENGINES_KEEP_LOGS"):
            os.makedirs(os.environ["ENGINES_KEEP_LOGS"], exist_ok=True)
            subprocess.run(["cp", os.path.join(pg_dir, "log"),
                            os.path.join(os.environ["ENGINES_KEEP_LOGS"], f"{int(time.time())}-postgresql.log")])
        subprocess.run([os.path.join(ROOT, "scripts/postgres.sh"), "stop", pg_dir], capture_output=True)


if __name__ == "__main__":
    main()
