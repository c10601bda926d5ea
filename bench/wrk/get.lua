-- GET the URL given to wrk (bench/run.py points it at /health); no body.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "summary.lua")
