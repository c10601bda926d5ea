-- bench/perf.py's request, configured from the environment (one script for every scenario):
--   GEOGATE_PERF_METHOD       GET or POST
--   GEOGATE_PERF_BODY         file holding the request body (sent as application/json), or ""
--   GEOGATE_PERF_HEADERS      "Name: value" lines (API key, X-Forwarded-For)
--   GEOGATE_PERF_THINK_MS     think time per connection after each response (wrk's delay()), 0: none
--   GEOGATE_PERF_PERCENTILES  file to write the latency percentiles 50..99.99 to (JSON, µs)
-- done() prints summary.lua's GEOGATE_WRK_SUMMARY line first, so bench/run.py's parser reads it.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "summary.lua")
local summary_done = done

wrk.method = os.getenv("GEOGATE_PERF_METHOD") or "GET"
local body_file = os.getenv("GEOGATE_PERF_BODY") or ""
if body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end
for line in (os.getenv("GEOGATE_PERF_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then wrk.headers[name] = value end
end

local think = tonumber(os.getenv("GEOGATE_PERF_THINK_MS") or "0") or 0
if think > 0 then
  function delay() return think end
end

local percentiles = {50, 75, 90, 95, 99, 99.5, 99.9, 99.99}
local out = os.getenv("GEOGATE_PERF_PERCENTILES") or ""

function done(summary, latency, requests)
  summary_done(summary, latency, requests)
  if out == "" then return end
  local parts = {}
  for _, p in ipairs(percentiles) do
    parts[#parts + 1] = string.format('"%s":%d', tostring(p), latency:percentile(p))
  end
  local f = assert(io.open(out, "w"))
  f:write("{" .. table.concat(parts, ",") .. "}\n")
  f:close()
end
