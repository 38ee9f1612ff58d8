-- Key header: cache responses by the request headers the origin's `Key` response
-- header names (draft-ietf-httpbis-key-01), the way a caching proxy that understands
-- Key would, on a shared dictionary every worker thread sees.
--
--   read_response: remember the first Key the origin sent for a URL;
--   read_request:  compute this request's secondary key from that Key, map it to a
--                  small generation id per URL, and make it the cache key's
--                  secondary part (txn:set_cache_key) — requests whose headers
--                  reduce to the same values share one cached response.
--
-- Needs a host with a shared dictionary named "meta":
--   hostscript serve --shared meta=1m --script examples/key_header.lua ...
local key = require "hs.key"

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

-- The generation id of SECONDARY for URL: the first thread to see a new secondary
-- key takes the URL's next id (incr); a thread that loses the race to add it uses
-- the winner's.
local function generation(url, secondary)
  local slot = "gen:" .. url .. "\0" .. secondary
  local gen = meta:get(slot)
  if gen then return gen end
  local next_id, err = meta:incr("max-genid:" .. url, 1, 0)
  if not next_id then return nil, err end
  meta:add(slot, next_id)
  return meta:get(slot)
end

-- Set the cache key of TXN from the Key value KV; nothing when the Key cannot be
-- processed (the cache then keys on the URL alone, as for a response without Key).
local function apply(txn, url, kv)
  local parts, err = key.secondary_key(kv, txn.req.headers)
  if not parts then
    hs.log.debug("Key of " .. url .. " not usable: " .. err)
    return
  end
  local gen, gerr = generation(url, key.join(parts))
  if gen then
    txn:set_cache_key("gen-" .. tostring(gen))
  else
    hs.log.warn("no generation id for " .. url .. ": " .. tostring(gerr))
  end
end

function KeyHeader:on_read_request(txn)
  local url = resource(txn)
  txn.ctx.key_url = url -- the URL as the client asked, whatever later hooks rewrite
  local kv = meta:get("key:" .. url)
  if kv then apply(txn, url, kv) end
end

function KeyHeader:on_read_response(txn)
  local lines = txn.resp.headers:get_all("key")
  if #lines == 0 then return end
  local url = txn.ctx.key_url or resource(txn)
  local kv = table.concat(lines, ",")
  -- the first Key wins until it expires; the response being stored now is keyed
  -- under it too, so the next request with the same secondary key is a hit
  if meta:add("key:" .. url, kv, KEY_TTL) == false then kv = meta:get("key:" .. url) or kv end
  apply(txn, url, kv)
end

return KeyHeader
