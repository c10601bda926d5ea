-- post_chat.lua (the fixed non-streaming chat completion) with an API key:
-- "Authorization: Bearer $GEOGATE_BENCH_API_KEY". bench/ratelimit_bench.py sets the variable
-- to the key of the tenant it configured, so the gateway identifies the tenant (auth:
-- required) and applies its rate-limit policy.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post_chat.lua")

local key = os.getenv("GEOGATE_BENCH_API_KEY")
assert(key and key ~= "", "GEOGATE_BENCH_API_KEY is not set")
wrk.headers["Authorization"] = "Bearer " .. key
