-- hs.util — small helpers handlers need again and again.
--
--   local util = require "hs.util"
--   util.split("a, b,c", ",")            --> {"a", "b", "c"}  (items trimmed)
--   util.parse_query("a=1&b=x%20y&a=2")  --> {a = {"1", "2"}, b = "x y"}
--   util.path_and_query("/p?q=1")        --> "/p", "q=1"

local find, sub, gsub, char, tonumber = string.find, string.sub, string.gsub, string.char, tonumber

local util = {}

--- Remove leading and trailing white space. Linear in #s: a pattern like
--- "^%s*(.-)%s*$" retries its tail at every position and is quadratic on long
--- runs of spaces, which request headers can be made of.
function util.trim(s)
  local i = find(s, "%S")
  if not i then return "" end
  local j = find(s, "%S%s*$", i)
  return sub(s, i, j)
end

--- Split s on the plain separator sep (default ","), trimming each item; empty items are dropped.
function util.split(s, sep)
  sep = sep or ","
  local out, n, pos = {}, 0, 1
  while true do
    local i, j = find(s, sep, pos, true)
    local item = util.trim(sub(s, pos, (i or 0) - 1))
    if item ~= "" then n = n + 1; out[n] = item end
    if not i then return out end
    pos = j + 1
  end
end

--- Decode %XX escapes and '+' as space.
function util.unescape(s)
  s = gsub(s, "+", " ")
  return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

--- The path and the query string (nil when absent) of a request URI.
function util.path_and_query(uri)
  local q = find(uri, "?", 1, true)
  if not q then return uri, nil end
  return sub(uri, 1, q - 1), sub(uri, q + 1)
end

--- Parse a query string into a table; repeated keys become lists.
function util.parse_query(q)
  local args = {}
  if not q or q == "" then return args end
  for pair in string.gmatch(q, "[^&]+") do
    local eq = find(pair, "=", 1, true)
    local k = util.unescape(eq and sub(pair, 1, eq - 1) or pair)
    local v = eq and util.unescape(sub(pair, eq + 1)) or true
    local prev = args[k]
    if prev == nil then
      args[k] = v
    elseif type(prev) == "table" then
      prev[#prev + 1] = v
    else
      args[k] = { prev, v }
    end
  end
  return args
end

return util
