-- wrk's done() hook: print one machine-readable line for benchmarks/load.py.
-- Latencies are in microseconds; errors are counted by kind.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "TRIO_BG_BENCH {\"requests\": %d, \"duration_us\": %d, \"p50_us\": %.1f, \"p99_us\": %.1f, "
      .. "\"connect\": %d, \"read\": %d, \"write\": %d, \"status\": %d, \"timeout\": %d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
