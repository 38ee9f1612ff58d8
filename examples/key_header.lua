-- Key header: cache responses by the request headers the origin's `Key` response
-- header names (draft-ietf-httpbis-key-01), the way a caching proxy that understands
-- Key would, on a shared dictionary every worker thread sees.
--
--   read_request:  compute this request's secondary key from the URL's Key, map it to
--                  a generation id per URL, and make it the cache key's secondary
--                  part (txn:set_cache_key) — requests whose headers reduce to the
--                  same values share one cached response.
--   read_response: remember the first Key the origin sent for a URL, and key the
--                  response being stored by it.
--   send_response: undo what read_response changed to keep a response out of the
--                  cache (below).
--
-- When the dictionary fails (one in Redis that is down or slow answers nil, err), the
-- URL's Key or a generation id is unknown, and neither a lookup nor a store under the
-- URL alone is safe: that entry would answer every request of the URL, whatever its
-- headers. Such a request bypasses the cache (hs.bypass): a warning is logged and
-- the origin answers it, as if there were no cache; it waits for the dictionary once
-- at most (no call follows a failed one).
--
-- Needs a host with a shared dictionary named "meta", in this process or in Redis:
--   hostscript serve --shared meta=1m --script examples/key_header.lua ...
--   hostscript serve --shared 'meta=redis://127.0.0.1:6379/0?prefix=kh:' --script ...
local key = require "hs.key"
local bypass = require "hs.bypass"

local KEY_TTL = 300 -- seconds a URL's Key is trusted before it is learnt again

local KeyHeader = {}

local meta = hs.shared.meta
if not meta then
  error("key_header.lua needs a shared dictionary named 'meta' (Host(shared={'meta': ...}))")
end

-- The URL as the cache keys it: the path alone, never the client's Host (the proxy
-- sends every request to one upstream, and its cache does not key on Host either: a
-- Host-qualified URL would let Host "evil" take generation ids that mean other
-- variants under Host "good", and replace their cached responses).
local function resource(txn)
  return txn.req.uri
end

-- The cache cannot be used for this request (hs.bypass: look up under a key nothing
-- is stored under, keep the response out).
local function skip(txn, url, why)
  bypass.request(txn, "Key of " .. url, why)
end

-- The generation id of SECONDARY under the Key value KV for URL: the first thread to
-- see a new one takes the URL's next id (incr); a thread that loses the race to add it
-- uses the winner's. The slot names the Key value too: after the Key expired and the
-- origin sent another, a secondary key that reads the same under the new Key is
-- another variant, and must not find the id (and the cached response) of the old one.
--
-- A URL's ids are never given twice while the responses keyed by them may be cached:
-- its counter starts at the clock in microseconds, so a counter that is lost (evicted,
-- or Redis restarted empty while the proxies' caches live on) starts again above
-- every id it gave before.
local function generation(url, kv, secondary)
  local slot = "gen:" .. url .. "\0" .. kv .. "\0" .. secondary
  local gen, err = meta:get(slot)
  if gen then return gen end
  if err then return nil, err end
  local next_id, ierr = meta:incr("max-genid:" .. url, 1, math.floor(hs.now() * 1e6))
  if not next_id then return nil, ierr end
  local ok, aerr = meta:add(slot, next_id)
  if not ok and aerr ~= "exists" then return nil, aerr end
  gen, err = meta:get(slot)
  if gen then return gen end
  return nil, err or "the generation id vanished" -- evicted at once: do not guess
end

-- Set the cache key of TXN from the Key value KV; nothing when the Key cannot be
-- processed (the cache then keys on the URL alone, as for a response without Key:
-- the draft says to fall back to Vary); bypassed when the dictionary failed.
local function apply(txn, url, kv)
  local parts, err = key.secondary_key(kv, txn.req.headers)
  if not parts then
    hs.log.debug("Key of " .. url .. " not usable: " .. err)
    return
  end
  local gen, gerr = generation(url, kv, key.join(parts))
  if gen then
    -- in decimal digits on both engines (a LuaJIT number, or one a LuaJIT process
    -- stored in Redis, is a double: tostring would say "1.7e+15" or "1.0")
    txn:set_cache_key(string.format("gen-%.0f", gen))
  else
    skip(txn, url, "no generation id: " .. tostring(gerr))
  end
end

function KeyHeader:on_read_request(txn)
  local url = resource(txn)
  txn.ctx.key_url = url -- the URL as the client asked, whatever later hooks rewrite
  local kv, err = meta:get("key:" .. url)
  if kv then
    apply(txn, url, kv)
  elseif err then
    skip(txn, url, err)
  end
end

function KeyHeader:on_read_response(txn)
  if bypass.active(txn) then -- no second wait for a failing dictionary
    return bypass.on_read_response(txn)
  end
  local lines = txn.resp.headers:get_all("key")
  local url = txn.ctx.key_url or resource(txn)
  if #lines > 0 then
    local kv = table.concat(lines, ",")
    -- the first Key wins until it expires; the response being stored now is keyed
    -- under it too, so the next request with the same secondary key is a hit
    local ok, err = meta:add("key:" .. url, kv, KEY_TTL)
    if not ok then
      if err == "exists" then kv, err = meta:get("key:" .. url) else kv = nil end
    end
    if not kv then
      skip(txn, url, err or "the Key vanished")
    else
      apply(txn, url, kv)
    end
  end
  bypass.on_read_response(txn)
end

function KeyHeader:on_send_response(txn)
  bypass.on_send_response(txn)
end

return KeyHeader
