-- Machine-readable result of one wrk run, for bench/run.py.
--
-- wrk calls done(summary, latency, requests) once, after every thread has finished. This
-- prints one line, "GEOGATE_WRK_SUMMARY " followed by a JSON object; run.py parses that line
-- and ignores wrk's human-readable text. Units: latencies in microseconds, duration in
-- microseconds, bytes in bytes. wrk counts a response with status >= 400 in errors.status
-- (its "Non-2xx or 3xx responses" line); connect/read/write/timeout are socket errors.

local percentiles = {50, 90, 99, 99.9}

function done(summary, latency, requests)
  local parts = {}
  for _, p in ipairs(percentiles) do
    parts[#parts + 1] = string.format('"%s":%d', tostring(p), latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    'GEOGATE_WRK_SUMMARY {"duration_us":%d,"requests":%d,"bytes":%d,'
      .. '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,"percentiles":{%s}},'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    latency.min, latency.mean, latency.max, latency.stdev, table.concat(parts, ","),
    e.connect, e.read, e.write, e.timeout, e.status))
end
