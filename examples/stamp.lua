-- Stamp: refuse requests that ask to be denied, and tell the client how long the
-- request spent between read_request and send_response (possibly on other threads).
local Stamp = {}

function Stamp:on_read_request(txn)
  if txn.req.headers["x-deny"] then
    return txn:respond(403, "denied\n", { ["content-type"] = "text/plain" })
  end
  txn.ctx.started = hs.now()
end

function Stamp:on_send_response(txn)
  local started = txn.ctx.started
  if started then
    txn.resp.headers["x-elapsed-ms"] = string.format("%.1f", (hs.now() - started) * 1e3)
  end
end

return Stamp
