-- hs.bypass — keep one request out of the reference proxy's cache (hostscript serve),
-- without the client seeing a difference: what a handler does when it cannot tell
-- how a response would be keyed (its shared dictionary or Redis failed), since a
-- lookup or a store under the URL alone would answer every variant of the URL.
--
--   local bypass = require "hs.bypass"
--   bypass.request(txn, "Key of /a", err)  -- read_request/read_response: from now on
--   bypass.active(txn)                     --   the lookup is a miss (cache key KEY)
--   bypass.on_read_response(txn)           -- no-store, keeping the origin's Cache-Control
--   bypass.on_send_response(txn)           -- the client gets the origin's Cache-Control back
--
-- The state lives in txn.ctx (bypass, bypass_cc), so it follows the request across
-- hooks and threads.

local bypass = {}

-- The secondary cache key of a bypassed request: nothing is ever stored under it
-- (its response is kept out), so its lookup is always a miss.
bypass.KEY = "key-unavailable"

--- Bypass the cache for TXN; WHAT and WHY go into one warning per request.
function bypass.request(txn, what, why)
  if not txn.ctx.bypass then
    hs.log.warn(what .. ": cache bypassed: " .. tostring(why))
    txn.ctx.bypass = true
  end
  txn:set_cache_key(bypass.KEY)
end

--- Whether TXN bypasses the cache.
function bypass.active(txn)
  return txn.ctx.bypass == true
end

--- read_response: keep a bypassed request's response out of the cache
--- (Cache-Control: no-store, which the cache reads after this hook), remembering the
--- origin's Cache-Control for on_send_response.
function bypass.on_read_response(txn)
  if not txn.ctx.bypass then return end
  local h = txn.resp.headers
  txn.ctx.bypass_cc = h:get_all("cache-control")
  h["cache-control"] = "no-store"
end

--- send_response: give the client the Cache-Control the origin sent.
function bypass.on_send_response(txn)
  local cc = txn.ctx.bypass_cc
  if not cc then return end
  local h = txn.resp.headers
  h["cache-control"] = nil
  for _, v in ipairs(cc) do h:add("cache-control", v) end
end

return bypass
