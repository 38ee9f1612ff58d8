-- Normalize: lower-case the path, drop tracking parameters from the query, and
-- remember the campaign in txn.ctx for later hooks.
local util = require "hs.util"

local Normalize = {}

local DROP = { utm_source = true, utm_medium = true, utm_campaign = true, fbclid = true }

function Normalize:on_read_request(txn)
  local path, query = util.path_and_query(txn.req.uri)
  local args = util.parse_query(query)
  local kept, campaign = {}, args.utm_campaign
  for pair in string.gmatch(query or "", "[^&]+") do
    local key = util.unescape(pair:match("^[^=]*"))
    if not DROP[key] then kept[#kept + 1] = pair end
  end
  local uri = path:lower()
  if #kept > 0 then uri = uri .. "?" .. table.concat(kept, "&") end
  if uri ~= txn.req.uri then txn.req.uri = uri end
  if campaign then txn.ctx.campaign = campaign end
end

return Normalize
