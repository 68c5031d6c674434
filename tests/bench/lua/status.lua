-- GET /link/status/<id>, rotating through the workflow ids in BENCH_IDS_FILE (one per line),
-- each thread from its own starting point. BENCH_TOKEN: the customer's token.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")

local ids = {}
local headers = {}
local next_index = 0

function init(args)
  for line in io.lines(os.getenv("BENCH_IDS_FILE")) do
    if #line > 0 then
      table.insert(ids, line)
    end
  end
  headers["customer-token"] = os.getenv("BENCH_TOKEN")
  next_index = (tid * 7919) % #ids
end

function request()
  next_index = next_index % #ids + 1
  return wrk.format("GET", "/link/status/" .. ids[next_index], headers)
end
