-- hs.key — the HTTP Key response header (draft-ietf-httpbis-key-01): parsing a Key
-- field value and computing the secondary cache key of a request under it.
--
--   local key = require "hs.key"
--   key.parse("Bar;div=5, Cookie;param=\"ID\"")
--     --> {{field = "Bar", params = {{"div", "5"}}}, {field = "Cookie", params = {{"param", "ID"}}}}
--   local parts, err = key.secondary_key(txn.resp.headers:get_all("Key"), txn.req.headers)
--     --> {"2", "abc"}   or   nil, 'item 1 ("Bar"): div: field value "x" is not 1*DIGIT'
--   key.join(parts)  --> "2\0abc\0"
--
-- A nil result from secondary_key is the draft's "fail parameter processing" (§2.2.2): the
-- cache must then act as if there were no Key (use Vary), or require the Key's request fields
-- to match as Vary would. An absent Key header is also nil, err: the draft says to use Vary.
-- The first failure ends the computation; no partial key is returned.
--
-- Readings where the draft is unclear or silent:
--   * parse accepts a bare field name (the §2 grammar allows it; its params are {}), and
--     secondary_key fails it (§2.2 step 5.2). An empty list element is a parse error.
--   * Unquoting (§2.2 step 5.7.6) replaces "\x" pairs only inside a value that was quoted.
--   * div: a divisor that is zero ("0", "00", ...) fails. The quotient is written in decimal
--     without leading zeros. Long division on digit strings, so any size is exact. A
--     divisor of up to 14 digits takes one step per digit of the field's number; a longer
--     one of d digits takes about (n - d + 10) * d for an n-digit number, and beyond
--     MAX_DIVISION_STEPS (half a million: 1000 digits by 500 is within) div fails instead.
--   * partition: boundaries are compared as exact decimals; the count stops at the first
--     boundary above the value. A value with an empty boundary ("20::40") fails, unless
--     the field is absent (that gives "none" first).
--
-- Cost: the Key value is read a few times; each parameter reads its field's value once.
-- No pattern here backtracks more than linearly, and substr avoids the quadratic worst
-- case of a plain string.find for long values.

local byte, char, concat, find, floor, format, gsub, sub, tonumber =
  string.byte, string.char, table.concat, string.find, math.floor, string.format, string.gsub,
  string.sub, tonumber

local key = {}

local QUOTE = 34
local MAX_DIVISION_STEPS = 500000 -- digit steps of one long division (see divide)

-- ===================================================================================
-- Strings
-- ===================================================================================

--- Remove leading and trailing WSP (SP and HTAB only). Linear: see hs.util.trim.
local function trim(s)
  local i = find(s, "[^ \t]")
  if not i then return "" end
  return sub(s, i, (find(s, "[^ \t][ \t]*$", i)))
end

local LOWER = {}
for c = 65, 90 do LOWER[char(c)] = char(c + 32) end

--- Lowercase ASCII letters only (string.lower follows the C locale).
local function lower(s)
  return (gsub(s, "[A-Z]", LOWER))
end

--- A short, printable rendering of s for error messages.
local function show(s)
  if #s > 40 then s = sub(s, 1, 40) .. "..." end
  return '"' .. gsub(s, "[%c\127-\255]", "?") .. '"'
end

--- Split s on every plain separator sep, quotes or not. Items are not trimmed.
local function split(s, sep)
  local out, n, pos = {}, 0, 1
  while true do
    local i = find(s, sep, pos, true)
    n = n + 1
    out[n] = sub(s, pos, (i or 0) - 1)
    if not i then return out end
    pos = i + 1
  end
end

--- Split s on each sep ("," or ";") outside quoted-strings; inside one, "\" escapes the
--- next character. A quote that is never closed runs to the end of s.
local function split_outside_quotes(s, sep)
  local out, n, start, pos = {}, 0, 1, 1
  local special = "[" .. sep .. '"]'
  while true do
    local i = find(s, special, pos)
    if not i then break end
    if byte(s, i) == QUOTE then
      pos = #s + 1
      local j = find(s, '["\\]', i + 1)
      while j do
        if byte(s, j) == QUOTE then pos = j + 1; break end
        j = find(s, '["\\]', j + 2)
      end
    else
      n = n + 1
      out[n] = sub(s, start, i - 1)
      start, pos = i + 1, i + 1
    end
  end
  out[n + 1] = sub(s, start)
  return out
end

--- The text before the first ",", or all of s.
local function before_comma(s)
  local i = find(s, ",", 1, true)
  return i and sub(s, 1, i - 1) or s
end

--- One field value from several lines (§2.2.1): each trimmed of WSP, joined with ",".
local function combine(values)
  local out = {}
  for i = 1, #values do out[i] = trim(values[i]) end
  return concat(out, ",")
end

--- Does text contain word? string.find(plain) is quadratic in the worst case
--- ("aaa...a" in "aaa...a"); a long word is searched with Knuth-Morris-Pratt instead.
local function contains(text, word)
  local m = #word
  if m <= 64 then return find(text, word, 1, true) ~= nil end
  local w, fall = {}, { [1] = 0 }
  for i = 1, m do w[i] = byte(word, i) end
  local k = 0 -- length of the longest proper prefix of w that ends here
  for i = 2, m do
    while k > 0 and w[k + 1] ~= w[i] do k = fall[k] end
    if w[k + 1] == w[i] then k = k + 1 end
    fall[i] = k
  end
  k = 0
  for i = 1, #text do
    local c = byte(text, i)
    while k > 0 and w[k + 1] ~= c do k = fall[k] end
    if w[k + 1] == c then k = k + 1 end
    if k == m then return true end
  end
  return false
end

-- ===================================================================================
-- Value syntax (§2.2 step 5.7.7)
-- ===================================================================================

local function is_digits(s)
  return find(s, "^%d+$") ~= nil
end

--- segment = [ 0*DIGIT "." ] 1*DIGIT
local function is_segment(s)
  return find(s, "^%d+$") ~= nil or find(s, "^%d*%.%d+$") ~= nil
end

--- partition = [ segment ] *( ":" [ segment ] )
local function is_partition(s)
  for _, b in ipairs(split(s, ":")) do
    if b ~= "" and not is_segment(b) then return false end
  end
  return true
end

local function is_token(s)
  return find(s, "^[0-9A-Za-z!#$%%&'*+%-.^_`|~]+$") ~= nil
end

--- quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE (RFC 7230 §3.2.6)
local function is_quoted_string(s)
  if #s < 2 or byte(s, 1) ~= QUOTE or byte(s, -1) ~= QUOTE then return false end
  local inner = gsub(sub(s, 2, -2), "\\[\t\32-\126\128-\255]", "") -- drop the quoted-pairs
  inner = gsub(inner, "\t", "")
  return not find(inner, '[%c\127"\\]') -- what is left must be qdtext
end

local function is_token_or_quoted(s)
  return is_token(s) or is_quoted_string(s)
end

-- ===================================================================================
-- Numbers as digit strings
-- ===================================================================================

--- Digits without leading zeros; "0" for zero.
local function significant(digits)
  local i = find(digits, "[1-9]")
  return i and sub(digits, i) or "0"
end

--- a >= b, for digit strings without leading zeros.
local function not_less(a, b)
  if #a ~= #b then return #a > #b end
  return a >= b
end

--- a - b, for digit strings without leading zeros and a >= b.
local function subtract(a, b)
  local out, borrow, shift = {}, 0, #a - #b
  for i = #a, 1, -1 do
    local x = byte(a, i) - 48 - borrow
    if i > shift then x = x - (byte(b, i - shift) - 48) end
    borrow = x < 0 and 1 or 0
    out[i] = x + 10 * borrow
  end
  return significant(concat(out))
end

--- s * k, for a digit string without leading zeros and 0 <= k <= 9.
local function times(s, k)
  local out, carry = {}, 0
  for i = #s, 1, -1 do
    local x = (byte(s, i) - 48) * k + carry
    carry = floor(x / 10)
    out[i + 1] = x - 10 * carry
  end
  out[1] = carry
  return significant(concat(out))
end

--- floor(a / d) in decimal, for digit strings without leading zeros; nil, why if it
--- cannot be computed.
local function divide(a, d)
  if d == "0" then return nil, "division by zero" end
  local q = {}
  if #d <= 14 then
    -- Remainders stay below 10 * d < 2^53, so every step is exact in a double.
    local r, dn = 0, tonumber(d)
    for i = 1, #a do
      r = r * 10 + (byte(a, i) - 48)
      local digit = floor(r / dn)
      q[i] = digit
      r = r - digit * dn
    end
    return significant(concat(q))
  end
  if #a < #d then return "0" end
  if (#a - #d + 10) * #d > MAX_DIVISION_STEPS then -- 9 multiples, then a subtraction a digit
    return nil, format("dividing a %d-digit number by a %d-digit one is beyond the bound of %d steps",
                       #a, #d, MAX_DIVISION_STEPS)
  end
  -- Schoolbook long division: each quotient digit is the largest k with d * k <= r.
  local multiples = {}
  for k = 1, 9 do multiples[k] = times(d, k) end
  local r = sub(a, 1, #d - 1)
  for i = #d, #a do
    r = significant(r .. sub(a, i, i))
    local digit = 0
    for k = 9, 1, -1 do
      if not_less(r, multiples[k]) then digit = k; break end
    end
    if digit > 0 then r = subtract(r, multiples[digit]) end
    q[#q + 1] = digit
  end
  return significant(concat(q))
end

--- A segment as {integer digits, fraction digits}, both without zeros that do not count.
local function decimal(s)
  local dot = find(s, ".", 1, true)
  local int, frac = s, ""
  if dot then int, frac = sub(s, 1, dot - 1), sub(s, dot + 1) end
  local last = find(frac, "[1-9]0*$") -- the last nonzero fraction digit
  return { significant(int), last and sub(frac, 1, last) or "" }
end

--- a < b, for results of decimal().
local function less(a, b)
  if a[1] ~= b[1] then return not not_less(a[1], b[1]) end
  return a[2] < b[2]
end

-- ===================================================================================
-- The parameters (§2.3): each takes the field value and the unquoted parameter value,
-- and returns a string, or nil and why it failed.
-- ===================================================================================

--- The field's number for div and partition: up to the first ",", with every WSP removed.
local function field_number(field_value)
  return (gsub(before_comma(field_value), "[ \t]", ""))
end

local function div(field_value, divisor)
  if divisor == "0" then return nil, "a divisor of 0 divides by zero" end
  if field_value == "" then return "none" end
  local n = field_number(field_value)
  if not is_digits(n) then return nil, "field value " .. show(n) .. " is not 1*DIGIT" end
  return divide(significant(n), significant(divisor))
end

local function partition(field_value, bounds)
  if field_value == "" then return "none" end
  local n = field_number(field_value)
  if not is_segment(n) then return nil, "field value " .. show(n) .. " is not a number" end
  local boundaries = split(bounds, ":")
  for i, b in ipairs(boundaries) do
    if b == "" then return nil, format("boundary %d is empty", i) end
  end
  local x, id = decimal(n), 0
  for _, b in ipairs(boundaries) do
    if less(x, decimal(b)) then break end
    id = id + 1
  end
  return tostring(id)
end

local function match(field_value, wanted)
  if field_value == "" then return "none" end
  for _, item in ipairs(split(field_value, ",")) do
    if trim(item) == wanted then return "1" end
  end
  return "0"
end

local function substr(field_value, wanted)
  if field_value == "" then return "none" end
  return contains(field_value, wanted) and "1" or "0"
end

local function param(field_value, wanted)
  wanted = lower(wanted)
  for _, list_item in ipairs(split(field_value, ",")) do
    for _, item in ipairs(split(list_item, ";")) do
      item = trim(item)
      local eq = find(item, "=", 1, true)
      if eq and lower(sub(item, 1, eq - 1)) == wanted then return sub(item, eq + 1) end
    end
  end
  return ""
end

local PARAMETERS = {
  div = { syntax = is_digits, syntax_name = "1*DIGIT", run = div },
  partition = { syntax = is_partition, syntax_name = "a list of numbers split by \":\"",
                run = partition },
  match = { syntax = is_token_or_quoted, syntax_name = "a token or quoted-string", run = match },
  substr = { syntax = is_token_or_quoted, syntax_name = "a token or quoted-string", run = substr },
  param = { syntax = is_token_or_quoted, syntax_name = "a token or quoted-string", run = param },
}

-- ===================================================================================
-- The Key value
-- ===================================================================================

--- The Key value from a string or a list of header lines; nil when there is none.
local function key_value(value)
  if type(value) == "table" then
    if #value == 0 then return nil end
    return combine(value)
  end
  if value ~= nil and type(value) ~= "string" then
    error("hs.key: the Key value must be a string or a list of strings, not " .. type(value), 3)
  end
  return value
end

--- Unquote a parameter value (§2.2 step 5.7.6).
local function unquote(v)
  if #v >= 2 and byte(v, 1) == QUOTE and byte(v, -1) == QUOTE then
    return (gsub(sub(v, 2, -2), "\\(.)", "%1"))
  end
  return v
end

--- Parse a Key field value (a string, or a list of Key header lines, combined as §2.2.1 says)
--- into {{field = name, params = {{name, value}, ...}}, ...}: parameter names lowercased,
--- values unquoted. A bare field name has params = {}. nil, err when the value is absent,
--- a list element is empty, or a parameter has no "=".
function key.parse(value)
  value = key_value(value)
  if value == nil then return nil, "no Key value" end
  local items = {}
  for i, text in ipairs(split_outside_quotes(value, ",")) do
    text = trim(text)
    if text == "" then return nil, format("item %d is empty", i) end
    local semi = find(text, ";", 1, true)
    local item = { field = trim(sub(text, 1, (semi or 0) - 1)), params = {} }
    if semi then
      for j, p in ipairs(split_outside_quotes(trim(sub(text, semi + 1)), ";")) do
        p = trim(p)
        local eq = find(p, "=", 1, true)
        if not eq then
          return nil, format("item %d (%s): parameter %d %s has no \"=\"", i, show(item.field), j,
                             show(p))
        end
        item.params[j] = { lower(sub(p, 1, eq - 1)), unquote(sub(p, eq + 1)) }
      end
    end
    items[i] = item
  end
  return items
end

--- A function name -> the combined value of that request field (§2.2.1).
local function field_reader(headers)
  if type(headers) ~= "table" and type(headers) ~= "userdata" then
    error("hs.key: headers must be a header map or a list of {name, value} pairs, not "
          .. type(headers), 3)
  end
  local seen = {}
  if headers.get_all then
    return function(name)
      local v = seen[name]
      if v == nil then v = combine(headers:get_all(name)); seen[name] = v end
      return v
    end
  end
  local by_name -- lowercased name -> list of values, built on first use
  return function(name)
    if not by_name then
      by_name = {}
      for _, pair in ipairs(headers) do
        local k = lower(pair[1])
        local list = by_name[k]
        if not list then list = {}; by_name[k] = list end
        list[#list + 1] = pair[2]
      end
    end
    local k = lower(name)
    local v = seen[k]
    if v == nil then v = combine(by_name[k] or {}); seen[k] = v end
    return v
  end
end

--- The secondary cache key of a request (§2.2): one result string per parameter, in Key
--- order. value is the Key field value (a string or a list of Key header lines); headers
--- the request's header map (txn.req.headers, anything with get_all) or a list of
--- {name, value} pairs. nil, err when parameter processing fails (§2.2.2); err names the
--- failing item.
local PARSED_MAX = 256 -- Key values whose parse secondary_key keeps (per Lua state)
local parsed, nparsed = {}, 0 -- Key value -> items, or an error message

-- key.parse(value) for secondary_key, remembered: a proxy sees the same few Key values
-- on every request. The items are never handed out, so nobody can change them.
local function parse_remembered(value)
  value = key_value(value)
  if value == nil then return nil, "no Key value" end
  local got = parsed[value]
  if got == nil then
    local items, err = key.parse(value)
    got = items or err
    if nparsed >= PARSED_MAX then parsed, nparsed = {}, 0 end
    parsed[value], nparsed = got, nparsed + 1
  end
  if type(got) == "string" then return nil, got end
  return got
end

function key.secondary_key(value, headers)
  local read = field_reader(headers)
  local items, err = parse_remembered(value)
  if not items then return nil, err end
  local parts, n = {}, 0
  for i, item in ipairs(items) do
    local function fail(why) return nil, format("item %d (%s): %s", i, show(item.field), why) end
    if #item.params == 0 then
      return fail("a field name without parameters fails (treat it as Vary does)")
    end
    local field_value = read(item.field)
    for _, p in ipairs(item.params) do
      local name, v = p[1], p[2]
      local def = PARAMETERS[name]
      if not def then return fail("unknown parameter " .. show(name)) end
      if not def.syntax(v) then
        return fail(name .. " value " .. show(v) .. " is not " .. def.syntax_name)
      end
      local result, why = def.run(field_value, v)
      if not result then return fail(name .. ": " .. why) end
      n = n + 1
      parts[n] = result
    end
  end
  return parts
end

local ESCAPES = { ["\\"] = "\\\\", ["\0"] = "\\0" }

--- One string from the results of secondary_key: each part followed by NUL, the separator
--- the draft suggests (§2.2 step 5.7.9). So that a part holding a NUL (header values cannot,
--- but a pairs list may) cannot collide, a "\" in a part is written "\\" and a NUL "\0";
--- parts without either come out exactly as the draft's key.
function key.join(parts)
  local out = {}
  for i = 1, #parts do out[i] = gsub(parts[i], "[%c\\]", ESCAPES) .. "\0" end
  return concat(out)
end

return key
