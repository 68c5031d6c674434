-- Shared by the bench scripts (tests/bench/wrk.py runs them): every script dofile()s this first.
-- wrk runs a script in several Lua states: one for setup() and done(), one per thread for
-- init()/request()/response(). Globals set here exist in each; threads report through
-- thread:get() at the end.
--
-- Environment: BENCH_QUOTA (stop a thread after that many responses; 0 = run for the
-- duration) and BENCH_STOP_FILE (a line is appended there when a thread stops on its quota).

local threads = {}

function setup(thread)
  -- A number per thread, so that the ids a thread makes up never meet another thread's.
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

-- Per thread: responses seen, how many were not 2xx, and those by status code.
responses = 0
non2xx = 0
statuses = {}
local quota = tonumber(os.getenv("BENCH_QUOTA") or "0") or 0
local stopped = false

function response(status, headers, body)
  responses = responses + 1
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    local code = tostring(status)
    statuses[code] = (statuses[code] or 0) + 1
  end
  if quota > 0 and responses >= quota and not stopped then
    stopped = true
    local marker = os.getenv("BENCH_STOP_FILE")
    if marker then
      local file = io.open(marker, "a")
      file:write("stopped\n")
      file:close()
    end
    wrk.thread:stop()
  end
end

-- One line of JSON, found by its prefix among wrk's own output. Latencies in microseconds.
function done(summary, latency, requests)
  local total_non2xx, codes = 0, {}
  for _, thread in ipairs(threads) do
    total_non2xx = total_non2xx + thread:get("non2xx")
    for code, count in pairs(thread:get("statuses")) do
      codes[code] = (codes[code] or 0) + count
    end
  end
  local parts = {}
  for code, count in pairs(codes) do
    table.insert(parts, string.format('"%s":%d', code, count))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,"statuses":{%s},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes, total_non2xx, table.concat(parts, ","),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
