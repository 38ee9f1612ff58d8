-- Headers: the everyday header work of a reverse proxy, in three hooks.
--   read_request:  drop a spoofed internal header; tag the request with an id
--   send_request:  tell the origin what the client asked for
--   send_response: security headers on every answer; hide the origin's software
local Headers = {}

local counter = 0 -- per thread state: ids are unique per state, prefixed by its address

local prefix = tostring({}):match("0x(%x+)") or "0"

function Headers:on_read_request(txn)
  local h = txn.req.headers
  h["x-internal-user"] = nil
  counter = counter + 1
  h["x-request-id"] = prefix .. "-" .. counter
end

function Headers:on_send_request(txn)
  txn.req.headers["x-forwarded-proto"] = "http"
end

function Headers:on_send_response(txn)
  local h = txn.resp.headers
  h["x-content-type-options"] = "nosniff"
  h["referrer-policy"] = "same-origin"
  h["server"] = nil
end

return Headers
