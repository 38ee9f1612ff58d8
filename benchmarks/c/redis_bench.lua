-- The handlers of benchmarks/redis_ops.py, one hook per operation, fired by the C
-- driver (c/redis_bench.c) and by Python threads alike. hs.shared.mem is in the
-- process, hs.shared.red in Redis; "v" holds a 64-byte string in both. A failed
-- call (nil, err) raises, so a broken contestant is an error, not a figure.
local B = {}
local mem, red = hs.shared.mem, hs.shared.red
local r = hs.redis("red")
local kc, kp = r.prefix .. "c", r.prefix .. "p"

local function ok(v, err)
  if v == nil then error(tostring(err), 0) end
end

function B:on_incr_mem(txn) ok(mem:incr("n", 1, 0)) end
function B:on_get_mem(txn) ok(mem:get("v")) end
function B:on_incr_redis(txn) ok(red:incr("n", 1, 0)) end
function B:on_get_redis(txn) ok(red:get("v")) end
function B:on_incr_call(txn) ok(r:call("INCR", kc)) end

function B:on_single16(txn)
  for _ = 1, 16 do ok(r:call("INCR", kp)) end
end

local function sixteen(p)
  for _ = 1, 16 do p:call("INCR", kp) end
end

function B:on_pipeline16(txn)
  local res, err = r:pipeline(sixteen)
  if not res or res.n ~= 16 or type(res[16]) ~= "number" then error(tostring(err), 0) end
end

return B
