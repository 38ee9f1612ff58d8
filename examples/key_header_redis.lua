-- Key header through hs.redis: examples/key_header.lua's flow written as Redis
-- commands, so that every proxy process behind one Redis computes the same cache
-- key for a request (draft-ietf-httpbis-key-01: cache responses by the request
-- headers the origin's `Key` response header names).
--
--   read_request:  this request's secondary key from the URL's Key (hs.key), mapped
--                  to a generation id per URL, made the cache key's secondary part
--                  (txn:set_cache_key "gen-<id>").
--   read_response: remember the first Key the origin sent for the URL, and key the
--                  response being stored by it.
--   send_response: undo what read_response changed to keep a response out of the
--                  cache (below).
--
-- Layout, under the dictionary's prefix P (r.prefix) and "kh:":
--   P.."kh:key:"..url   hash  value -> the first Key the origin sent for url (HSETNX);
--                             the hash expires KEY_TTL s after that (EXPIRE NX)
--   P.."kh:gen:"..url   hash  max-genid -> the last id given out (HINCRBY; it starts
--                             at the clock in microseconds, below)
--                             <Key value> NUL <secondary key> -> its id (HSETNX: a
--                             process that loses the race takes the winner's)
-- The generation hashes have no TTL: an id must never be given again while a cached
-- response is keyed by it, so run Redis with `maxmemory-policy` noeviction or one of
-- the volatile-* policies (which evict keys with a TTL only). EXPIRE NX needs
-- Redis 7.0; an older one answers an error, and every request bypasses the cache
-- with a warning saying so.
--
-- Round trips: read_request 2 (the Key, the id); read_response 1 (a pipeline: learn
-- the Key, read it back, read the id of this response's secondary key). A secondary
-- key seen for the first time costs 2 more (HSETNX + HINCRBY of max-genid, then
-- HSETNX + HGET of its id, each pair pipelined).
--
-- When Redis fails (down, slow past the URL's timeout: nil, err), the URL's Key or a
-- generation id is unknown, and neither a lookup nor a store under the URL alone is
-- safe: that entry would answer every request of the URL, whatever its headers.
-- Such a request bypasses the cache (hs.bypass): a warning is logged and the
-- origin answers it, as if there were no cache; it waits for Redis once at most (no
-- call follows a failed one). Once Redis answers again (the connection comes back by
-- itself), so does the cache.
--
-- Needs the shared dictionary "meta" in Redis, whose endpoint hs.redis("meta") uses:
--   hostscript serve --shared 'meta=redis://127.0.0.1:6379/0?prefix=kh:&timeout=0.2' \
--                    --script examples/key_header_redis.lua ...
local key = require "hs.key"
local bypass = require "hs.bypass"

local KEY_TTL = 300 -- seconds a URL's Key is trusted before it is learnt again

local found, r = pcall(hs.redis, "meta")
if not found then
  error("key_header_redis.lua needs the shared dictionary 'meta' in Redis "
        .. "(--shared meta=redis://...): " .. tostring(r), 0)
end
local KEYS = r.prefix .. "kh:key:"
local GENS = r.prefix .. "kh:gen:"

local KeyHeader = {}

-- The URL as the cache keys it: the path alone, never the client's Host (see
-- key_header.lua).
local function resource(txn)
  return txn.req.uri
end

-- The cache cannot be used for this request (hs.bypass: look up under a key nothing
-- is stored under, keep the response out).
local function skip(txn, url, why)
  bypass.request(txn, "Key of " .. url, why)
end

-- The commands FN sends, in one round trip: their replies (a nil reply is false), or
-- nil, err when the round trip or one of the commands failed.
local function pipeline(fn)
  local replies, err = r:pipeline(fn)
  if not replies then return nil, err end
  for i = 1, replies.n do
    local reply = replies[i]
    if type(reply) == "table" and reply.err then return nil, "redis: " .. reply.err end
  end
  return replies
end

-- The field of a secondary key in the URL's generation hash: the Key value is part
-- of it, so that after the Key expired and the origin sent another, a secondary key
-- that reads the same under the new Key is another variant and gets another id.
local function gen_field(kv, secondary)
  return kv .. "\0" .. secondary
end

-- The generation id of FIELD for URL. KNOWN: its HGET reply when already read (a
-- string, or false for none), saving that round trip.
--
-- A URL's ids are never given twice while the responses keyed by them may be cached:
-- its counter starts at the clock in microseconds (HSETNX before the HINCRBY), so a
-- counter that is lost (Redis restarted empty, or flushed, while the proxies' caches
-- live on) starts again above every id it gave before.
local function generation(url, field, known)
  local gens = GENS .. url
  local id, err = known, nil
  if id == nil then
    id, err = r:call("HGET", gens, field)
    if err then return nil, err end
  end
  if id then return id end
  local counted, cerr = pipeline(function(p)
    p:call("HSETNX", gens, "max-genid", math.floor(hs.now() * 1e6))
    p:call("HINCRBY", gens, "max-genid", 1)
  end)
  if not counted then return nil, cerr end
  local next_id = counted[2]
  local replies, perr = pipeline(function(p)
    p:call("HSETNX", gens, field, next_id)
    p:call("HGET", gens, field) -- ours, or the one of whoever set it first
  end)
  if not replies then return nil, perr end
  if replies[2] then return replies[2] end
  return nil, "the generation id vanished"
end

-- Set the cache key of TXN to generation ID (bypassed when there is none).
local function use(txn, url, id, err)
  if id then
    txn:set_cache_key("gen-" .. id)
  else
    skip(txn, url, "no generation id: " .. tostring(err))
  end
end

-- Set the cache key of TXN from the Key value KV; nothing when the Key cannot be
-- processed (the cache then keys on the URL alone, as for a response without Key:
-- the draft says to fall back to Vary); bypassed when Redis failed.
local function apply(txn, url, kv)
  local parts, err = key.secondary_key(kv, txn.req.headers)
  if not parts then
    hs.log.debug("Key of " .. url .. " not usable: " .. err)
    return
  end
  use(txn, url, generation(url, gen_field(kv, key.join(parts))))
end

function KeyHeader:on_read_request(txn)
  local url = resource(txn)
  txn.ctx.key_url = url -- the URL as the client asked, whatever later hooks rewrite
  local kv, err = r:call("HGET", KEYS .. url, "value")
  if kv then
    apply(txn, url, kv)
  elseif err then
    skip(txn, url, err)
  end
end

function KeyHeader:on_read_response(txn)
  if bypass.active(txn) then -- no second wait for a failing Redis
    return bypass.on_read_response(txn)
  end
  local lines = txn.resp.headers:get_all("key")
  local url = txn.ctx.key_url or resource(txn)
  if #lines > 0 then
    local kv = table.concat(lines, ",")
    local keys = KEYS .. url
    -- this response's secondary key under its own Key: when that Key is the one
    -- that wins (the usual case), its id comes back in the same round trip
    local parts = key.secondary_key(kv, txn.req.headers)
    local field = parts and gen_field(kv, key.join(parts))
    local replies, err = pipeline(function(p)
      -- the first Key wins until it expires; the response being stored now is
      -- keyed under it too, so the next request with the same secondary key hits
      p:call("HSETNX", keys, "value", kv)
      p:call("EXPIRE", keys, KEY_TTL, "NX")
      p:call("HGET", keys, "value")
      if field then p:call("HGET", GENS .. url, field) end
    end)
    if not replies then
      skip(txn, url, err)
    elseif not replies[3] then
      skip(txn, url, "the Key vanished")
    else
      local won = replies[3]
      if won == kv and field then
        use(txn, url, generation(url, field, replies[4]))
      else
        apply(txn, url, won)
      end
    end
  end
  bypass.on_read_response(txn)
end

function KeyHeader:on_send_response(txn)
  bypass.on_send_response(txn)
end

return KeyHeader
