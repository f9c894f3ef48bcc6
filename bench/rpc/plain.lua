-- wrk script: the same server's liveness probe (no authentication, no signing, no database):
-- the HTTP stack's own ceiling on this machine, the reference `sign_event` is compared with.
done = function(summary, latency, requests)
  io.write(string.format('{"bench":"rpc-healthz-live","requests":%d,"seconds":%.2f,"req_per_s":%.0f,"p50_ms":%.2f,"p90_ms":%.2f,"p99_ms":%.2f,"max_ms":%.2f,"non_2xx":%d,"timeouts":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    summary.errors.status, summary.errors.timeout,
    summary.errors.connect + summary.errors.read + summary.errors.write))
end
