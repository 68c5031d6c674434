-- A, the yardstick: GET of the no-I/O endpoint (config/yardstick.py). wrk's static request,
-- the URL's path; nothing is built per request.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
