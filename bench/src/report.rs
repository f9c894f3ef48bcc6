//! Markdown tables from result lines.

use std::fmt::Write;
use std::path::PathBuf;

use serde_json::Value;

#[derive(clap::Args)]
pub struct Args {
    /// Files of JSON lines written by the other subcommands (other lines are skipped).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    for path in &args.inputs {
        for line in std::fs::read_to_string(path)?.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                if v.get("bench").is_some() {
                    lines.push(v);
                }
            }
        }
    }
    print!("{}", render(&lines));
    Ok(())
}

fn f(v: &Value, digits: usize) -> String {
    v.as_f64().map_or_else(|| "–".to_owned(), |x| format!("{x:.digits$}"))
}

fn ratio(a: &Value, b: &Value) -> String {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
        _ => "–".to_owned(),
    }
}

fn of<'a>(lines: &'a [Value], bench: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["bench"] == bench).collect()
}

pub fn render(lines: &[Value]) -> String {
    let mut s = String::new();
    let lag = of(lines, "lag");
    if !lag.is_empty() {
        let find = |store: &str, rate: u64, tool: &str, config_prefix: &str| {
            lag.iter().copied().find(|l| {
                l["store"] == store
                    && l["observer"] != false
                    && l["rate"].as_u64() == Some(rate)
                    && l["tool"] == tool
                    && l["config"].as_str().is_some_and(|c| c.starts_with(config_prefix))
            })
        };
        let _ = writeln!(s, "### Replication lag\n");
        let _ = writeln!(
            s,
            "Lag = first time a level-0 file holding the commit was visible in the replica − time the commit returned. \
             Ratios are keycast ÷ Litestream (below 1 means keycast is faster).\n"
        );
        let _ = writeln!(
            s,
            "| store | commits/s | keycast p50 / p99 ms | Litestream 1 s (shipped) p50 / p99 ms | p99 ratio | Litestream 100 ms p50 / p99 ms | p99 ratio |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
        let mut stores: Vec<&str> = lag.iter().filter_map(|l| l["store"].as_str()).collect();
        stores.dedup();
        stores.sort_unstable();
        stores.dedup();
        let mut rates: Vec<u64> = lag.iter().filter_map(|l| l["rate"].as_u64()).collect();
        rates.sort_unstable();
        rates.dedup();
        let pp = |l: Option<&&Value>| {
            l.map_or("–".to_owned(), |l| {
                format!("{} / {}", f(&l["lag_ms"]["p50"], 1), f(&l["lag_ms"]["p99"], 1))
            })
        };
        let p99 = |l: Option<&&Value>| l.map_or(Value::Null, |l| l["lag_ms"]["p99"].clone());
        for store in &stores {
            for rate in &rates {
                let k = find(store, *rate, "keycast", "");
                let l1 = find(store, *rate, "litestream", "1s");
                let l100 = find(store, *rate, "litestream", "100ms");
                if k.is_none() && l1.is_none() && l100.is_none() {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "| {store} | {rate} | {} | {} | {} | {} | {} |",
                    pp(k.as_ref()),
                    pp(l1.as_ref()),
                    ratio(&p99(k.as_ref()), &p99(l1.as_ref())),
                    pp(l100.as_ref()),
                    ratio(&p99(k.as_ref()), &p99(l100.as_ref())),
                );
            }
        }
        render_acknowledged(&mut s, &lag);
        let _ = writeln!(s, "\nDetails per run:\n");
        let _ = writeln!(
            s,
            "| store | commits/s | tool | config | achieved/s | measured | unmatched | p50 | p90 | p99 | max ms | L0 files | commits/file | WAL gens | commit p99 ms | store PUT p50 / p99 / max ms (same seconds) |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for l in lag.iter().filter(|l| l["observer"] != false) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                l["store"].as_str().unwrap_or(""),
                l["rate"],
                l["tool"].as_str().unwrap_or(""),
                l["config"].as_str().unwrap_or(""),
                f(&l["achieved_rate"], 1),
                l["lag_ms"]["count"],
                l["unmatched"],
                f(&l["lag_ms"]["p50"], 1),
                f(&l["lag_ms"]["p90"], 1),
                f(&l["lag_ms"]["p99"], 1),
                f(&l["lag_ms"]["max"], 1),
                l["files_seen"],
                f(&l["commits_per_file"], 2),
                l["wal_generations"],
                f(&l["commit_ms"]["p99"], 2),
                match l["store_put_ms"]["count"].as_u64() {
                    Some(n) if n > 0 => format!(
                        "{} / {} / {}",
                        f(&l["store_put_ms"]["p50"], 1),
                        f(&l["store_put_ms"]["p99"], 1),
                        f(&l["store_put_ms"]["max"], 1)
                    ),
                    _ => "–".to_owned(),
                },
            );
        }
        let _ = writeln!(s);
    }

    let tp = of(lines, "throughput");
    if !tp.is_empty() {
        let _ = writeln!(
            s,
            "### Write throughput (sequential single-row commits, file:// replica)\n"
        );
        let _ = writeln!(
            s,
            "| variant | runs (commits/s) | median commits/s | ÷ same pool, no replicator | ÷ plain SQLite | CPU µs per commit (median) | CPU ÷ plain |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
        for t in &tp {
            let runs = |k: &str| {
                t["runs"][k]
                    .as_array()
                    .map(|a| a.iter().map(|x| f(x, 0)).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            };
            let m = |k: &str| f(&t["median"][k], 0);
            let cpu = &t["cpu_us_per_commit"];
            let row = |s: &mut String, name: &str, k: &str, vs_pool: String, vs_plain: String| {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {vs_pool} | {vs_plain} | {} | {} |",
                    runs(k),
                    m(k),
                    f(&cpu[k], 1),
                    ratio(&cpu[k], &cpu["plain"])
                );
            };
            row(
                &mut s,
                "keycast pool + replicator",
                "keycast",
                f(&t["keycast_vs_pool"], 3),
                f(&t["keycast_vs_plain"], 3),
            );
            row(
                &mut s,
                "same keycast pool, no replicator (WAL never checkpointed)",
                "pool",
                "1.000".into(),
                ratio(&t["median"]["pool"], &t["median"]["plain"]),
            );
            row(
                &mut s,
                "plain SQLite WAL pool, default autocheckpoint, no replication",
                "plain",
                ratio(&t["median"]["plain"], &t["median"]["pool"]),
                "1.000".into(),
            );
            if !t["median"]["litestream"].is_null() {
                row(
                    &mut s,
                    "plain pool + Litestream 0.5.17 (shipped defaults)",
                    "litestream",
                    f(&t["litestream_vs_pool"], 3),
                    f(&t["litestream_vs_plain"], 3),
                );
            }
        }
        let runs = of(lines, "throughput-run");
        let k: Vec<_> = runs.iter().filter(|r| r["variant"] == "keycast").collect();
        if !k.is_empty() {
            let list = |key: &str, d: usize| k.iter().map(|r| f(&r[key], d)).collect::<Vec<_>>().join(", ");
            let _ = writeln!(
                s,
                "\nCPU: user + system time over the timed window, per commit, of the bench process (the writer, \
                 keycast's replicator when it runs, a WAL-size sampler) plus the Litestream process for that variant. \
                 keycast runs: commits per segment {}; checkpoints {}; replicator catch-up after the writer stopped {} ms.",
                list("commits_per_segment", 1),
                list("checkpoints", 0),
                list("catch_up_ms", 1)
            );
        }
        let _ = writeln!(s, "\nLargest WAL file per run (MiB):\n");
        let _ = writeln!(s, "| variant | WAL MiB per run |");
        let _ = writeln!(s, "|---|---|");
        for v in ["keycast", "pool", "plain", "litestream"] {
            let w: Vec<String> = runs
                .iter()
                .filter(|r| r["variant"] == v)
                .map(|r| format!("{:.0}", r["wal_bytes"].as_f64().unwrap_or(0.0) / 1048576.0))
                .collect();
            if !w.is_empty() {
                let _ = writeln!(s, "| {v} | {} |", w.join(", "));
            }
        }
        let _ = writeln!(s);
    }

    let rs = of(lines, "restore");
    if !rs.is_empty() {
        let _ = writeln!(s, "### Restore\n");
        let _ = writeln!(
            s,
            "Median of the runs; every restored file matched the source's database checksum unless marked. \
             keycast always runs `PRAGMA integrity_check`; Litestream's default is no check.\n"
        );
        let _ = writeln!(
            s,
            "| replica | built | DB MiB | replica files | keycast s | Litestream s | keycast ÷ Litestream | Litestream `-integrity-check full` s | keycast ÷ that | verified |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
        for r in &rs {
            let mib = r["db_bytes"]
                .as_f64()
                .map_or("–".into(), |b| format!("{:.0}", b / 1048576.0));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r["store"].as_str().unwrap_or(""),
                r["mode"].as_str().unwrap_or(""),
                mib,
                r["replica_files"],
                f(&r["keycast_s"], 2),
                f(&r["litestream_s"], 2),
                f(&r["keycast_vs_litestream"], 3),
                f(&r["litestream_integrity_s"], 2),
                f(&r["keycast_vs_litestream_integrity"], 3),
                if r["verified"] == true { "yes" } else { "**NO**" },
            );
        }
        let builds = of(lines, "restore-build");
        if !builds.is_empty() {
            let _ = writeln!(s, "\nReplicas restored (built by keycast):\n");
            let _ = writeln!(s, "| replica | built | DB MiB | rows | build s | files per level |");
            let _ = writeln!(s, "|---|---|---:|---:|---:|---|");
            for b in &builds {
                let levels = b["levels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| {
                                format!(
                                    "L{k}: {} ({:.0} MiB)",
                                    v["files"],
                                    v["bytes"].as_f64().unwrap_or(0.0) / 1048576.0
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {} | {} | {} |",
                    b["store"].as_str().unwrap_or(""),
                    b["mode"].as_str().unwrap_or(""),
                    b["db_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                    b["rows"],
                    f(&b["build_s"], 1),
                    levels
                );
            }
        }
        let _ = writeln!(s);
    }
    s
}

/// keycast's lag measured to the store's answer to each upload (S3 runs only; see
/// `crate::acks`), with and without the observer loading the store.
fn render_acknowledged(s: &mut String, lag: &[&Value]) {
    let rows: Vec<&&Value> = lag.iter().filter(|l| l["lag_ack_ms"].is_object()).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nkeycast on S3, lag to the store's answer: from the commit to the moment the store answered the \
         upload of the file holding it, recorded in keycast's store client. The store makes an object readable \
         before it answers, so this is never shorter than the true lag, and it has no poll interval in it. \
         *Observer* says whether the observer above was polling the same store (one more GET per file). \
         The store PUT probe runs in the same seconds.\n"
    );
    let _ = writeln!(
        s,
        "| store server | commits/s | observer | measured | to the answer p50 / p90 / p99 / max ms | store PUT probe p50 / p99 / max ms |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|---:|");
    for l in rows {
        let a = &l["lag_ack_ms"];
        let p = &l["store_put_ms"];
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} / {} / **{}** / {} | {} / {} / {} |",
            l["label"].as_str().unwrap_or("moto"),
            l["rate"],
            if l["observer"] == false { "off" } else { "on" },
            a["count"],
            f(&a["p50"], 1),
            f(&a["p90"], 1),
            f(&a["p99"], 1),
            f(&a["max"], 1),
            f(&p["p50"], 1),
            f(&p["p99"], 1),
            f(&p["max"], 1),
        );
    }
}
