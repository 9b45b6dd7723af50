-- POST a JSON body with a number unique to this run, thread and request.
-- wrk ... -s bench/wrk/post.lua URL -- KIND RUN TOKEN
--   KIND: build (POST /api/v1/builds), release (POST /api/v1/releases), bare (the bare insert view)
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local kind, run, token
local n = 0

function init(args)
  kind, run, token = args[1], args[2], args[3]
end

local function body(unique)
  if kind == "build" then
    return string.format('{"application":"MAC","number":"bench-%s","commit":"0123456789abcdef0123456789abcdef01234567",'
      .. '"branch":"feature/BIZPLAT-1-bench","url":"https://ci.example.com/mac/bench","status":"successful",'
      .. '"tests":{"passed":1000,"failed":0,"skipped":3}}', unique)
  elseif kind == "release" then
    return string.format('{"application":"MAC","version":"9.%s","build":"1",'
      .. '"artifact_url":"https://artifacts.example.com/mac/9.%s.tar.gz",'
      .. '"artifact_sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",'
      .. '"issue_keys":["BIZPLAT-1"],"implementers":["dev1@example.com"]}', unique, unique)
  else
    return string.format('{"number":"%s","status":"successful"}', unique)
  end
end

function request()
  n = n + 1
  local headers = {["Content-Type"] = "application/json"}
  if token ~= nil and token ~= "" then
    headers["Authorization"] = "Bearer " .. token
  end
  return wrk.format("POST", nil, headers, body(string.format("%s.%d.%d", run, tid, n)))
end
