"""Registers a user and runs the OAuth 2.0 + PKCE flow against a running keycast with only the
standard library; prints one field of the token response (default access_token; bench/nip46.sh
asks for bunker_url). Used by the benchmarks to get a credential to load-test."""
import base64, hashlib, http.cookiejar, json, re, secrets, sys, urllib.parse, urllib.request

base = sys.argv[1]
jar = http.cookiejar.CookieJar()

class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None

opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)

def call(method, path, body=None, content_type="application/json"):
    data = None if body is None else (json.dumps(body).encode() if content_type == "application/json" else body.encode())
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with opener.open(req) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()

email = f"bench-{secrets.token_hex(4)}@example.com"
status, _, body = call("POST", "/api/auth/register", {"email": email, "password": "bench password 1"})
assert status == 201, body
# keycast authorizes apps only for confirmed addresses: confirm through the development
# outbox (the instance runs with KEYCAST_TEST_ROUTES=true).
status, _, body = call("GET", "/api/test/outbox")
assert status == 200, "start keycast with KEYCAST_TEST_ROUTES=true: " + body
token = [m["token"] for m in json.loads(body)["messages"] if m["to"] == email and m["purpose"] == "verify_email"][-1]
status, _, body = call("POST", "/api/auth/verify-email", {"token": token, "password": "bench password 1"})
assert status == 200, body
verifier = secrets.token_urlsafe(48)
challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
redirect = "http://127.0.0.1:9/callback"
query = urllib.parse.urlencode({"client_id": "bench", "redirect_uri": redirect, "response_type": "code",
    "scope": "policy:social", "state": "s", "code_challenge": challenge, "code_challenge_method": "S256"})
status, _, page = call("GET", "/api/oauth/authorize?" + query)
assert status == 200, page
fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
# A script, not a person: no "shown" stamp, which would refuse an approval sent at once.
fields.pop("shown", None)
fields["decision"] = "approve"
status, headers, body = call("POST", "/api/oauth/authorize", urllib.parse.urlencode(fields), "application/x-www-form-urlencoded")
assert status in (302, 303), (status, body)
code = urllib.parse.parse_qs(urllib.parse.urlparse(headers["Location"]).query)["code"][0]
status, _, body = call("POST", "/api/oauth/token", {"grant_type": "authorization_code", "code": code,
    "client_id": "bench", "redirect_uri": redirect, "code_verifier": verifier})
assert status == 200, body
print(json.loads(body)[sys.argv[2] if len(sys.argv) > 2 else "access_token"])
