-- The ack path: POST /link, each request with a new Idempotency-Key and a new patient id, so
-- that every one is accepted (202), none replayed and none refused as already in progress.
--
-- Environment: BENCH_TOKEN (the customer's token), BENCH_PREFIX (8 hex digits, new per run:
-- the first group of every patient id, which is how the harness finds this run's workflows).
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")

local token = os.getenv("BENCH_TOKEN")
local prefix = os.getenv("BENCH_PREFIX")
local sent = 0

-- README.md's example request: a full name and a birth date (enough to be accepted), contact
-- and insurance; the stand-in finds exactly one certain match for it (standin/README.md).
local body_format = '{"patient":{"id":"%s","full_name":"Jane Q Doe","dob":"1980-04-02",' ..
  '"contact":{"address":"1 Main St, Springfield","phone":"+1-555-0100",' ..
  '"email":"jane@example.org"},"insurance":{"payer":"Acme Health","member_id":"A123"}}}'

function request()
  sent = sent + 1
  -- Unique without randomness: run prefix, thread, counter (a well-formed version 4 UUID).
  local patient = string.format("%s-%04x-4000-8000-%012x", prefix, tid, sent)
  local headers = {
    ["Content-Type"] = "application/json",
    ["customer-token"] = token,
    ["Idempotency-Key"] = string.format("bench-%s-%d-%d", prefix, tid, sent),
  }
  return wrk.format("POST", "/link", headers, string.format(body_format, patient))
end
