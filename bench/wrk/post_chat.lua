-- POST one fixed, non-streaming OpenAI chat completion (model geogate-chat, one short user
-- message) to the URL given to wrk; bench/run.py points it at /v1/chat/completions.
-- The body is bench/wrk/chat_body.json, which run.py also sends once through the gateway
-- to check the answer before measuring. It never changes, so every request costs the
-- backend the same.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "summary.lua")

local f = assert(io.open(here .. "chat_body.json", "rb"))
local body = f:read("*a"):gsub("%s+$", "")
f:close()

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = body
