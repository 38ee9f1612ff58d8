-- hostscript bench --ats: the work every contestant does, as a hostscript handler
-- class (the plugin's script). The same three hooks of header work in
-- header_rewrite.config (header_rewrite.so) and ts_lua.lua (tslua.so):
--   read_request:  read User-Agent and Host, set one request header from them
--   send_request:  set one header on the request to the origin
--   send_response: set one header on the response to the client
local Bench = {}

function Bench:on_read_request(txn)
  local h = txn.req.headers
  h["x-bench-client"] = (h["user-agent"] or "-") .. "@" .. (h["host"] or "-")
end

function Bench:on_send_request(txn)
  txn.req.headers["x-bench-send"] = "1"
end

function Bench:on_send_response(txn)
  txn.resp.headers["x-bench-out"] = "1"
end

return Bench
