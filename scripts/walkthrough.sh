#!/usr/bin/env bash
# The README's five-minute walk-through, as one script: register, confirm the email,
# authorize an app (OAuth 2.0 + PKCE), sign over the HTTP RPC, then sign over NIP-46 with
# nostr-tools' BunkerSigner using the authorization's bunker:// URL.
#
#   cargo run --release -- serve 2>&1 | tee keycast.log     # in one terminal
#   scripts/walkthrough.sh keycast.log                      # in another
#
# KEYCAST_URL (default http://localhost:3000) is where keycast answers. The log file is
# where keycast's development outbox (no SMTP configured) logs the verification link.
# Needs curl, jq, openssl and Node 20+; nostr-tools and ws are installed into
# NOSTR_TOOLS_DIR (default ~/.cache/keycast-walkthrough) on first use.
# The test `walkthrough` in crates/keycast/tests runs this script against a real keycast.
set -euo pipefail
log="${1:?usage: scripts/walkthrough.sh KEYCAST_LOG_FILE}"
kc="${KEYCAST_URL:-http://localhost:3000}"
here="$(cd "$(dirname "$0")" && pwd)"
jar="$(mktemp)"; trap 'rm -f "$jar"' EXIT
say() { printf '\n== %s\n' "$*" >&2; }
json() { curl -sS --fail-with-body -b "$jar" -c "$jar" -H 'Content-Type: application/json' -H "Origin: $kc" "$@"; }

say "1. Register an account (keycast generates its Nostr key and keeps it encrypted)"
email="walkthrough-$(date +%s)-$RANDOM@example.com"
password="correct horse battery staple"
json -d "{\"email\": \"$email\", \"password\": \"$password\"}" "$kc/api/auth/register" | jq .

say "2. Confirm the email: the link keycast mailed (logged by the development outbox)"
token=""
for _ in $(seq 50); do
  token="$(grep -o "verify-email#token=[A-Za-z0-9_-]*" "$log" | tail -1 | cut -d= -f2 || true)"
  [ -n "$token" ] && break
  sleep 0.1
done
[ -n "$token" ] || { echo "no verification link in $log (is SMTP configured?)" >&2; exit 1; }
json -d "{\"token\": \"$token\", \"password\": \"$password\"}" "$kc/api/auth/verify-email" | jq -c .

say "3. Authorize an app: OAuth 2.0 with PKCE, scope policy:social"
verifier="$(openssl rand -hex 32)"
challenge="$(printf '%s' "$verifier" | openssl dgst -sha256 -binary | base64 | tr '+/' '-_' | tr -d '=')"
redirect="http://127.0.0.1:8080/callback"
# An app sends the user's browser to /api/oauth/authorize; the owner approves on the consent
# page. Here the approval goes through the same endpoint as JSON, as keycast's pages send it.
code="$(json -d "{\"client_id\": \"walkthrough-app\", \"redirect_uri\": \"$redirect\", \"scope\": \"policy:social\",
  \"state\": \"xyz\", \"code_challenge\": \"$challenge\", \"code_challenge_method\": \"S256\", \"approved\": true}" \
  "$kc/api/oauth/authorize" | jq -r .code)"
grant="$(curl -sS --fail-with-body "$kc/api/oauth/token" -d grant_type=authorization_code -d "code=$code" \
  -d client_id=walkthrough-app --data-urlencode "redirect_uri=$redirect" -d "code_verifier=$verifier")"
echo "$grant" | jq '{token_type, expires_in, scope, bunker_url}'
access_token="$(echo "$grant" | jq -r .access_token)"
bunker_url="$(echo "$grant" | jq -r .bunker_url)"

say "4. Sign over HTTP: POST /api/nostr with the access token"
curl -sS --fail-with-body "$kc/api/nostr" -H "Authorization: Bearer $access_token" -H 'Content-Type: application/json' \
  -d "{\"method\": \"sign_event\", \"params\": [{\"kind\": 1, \"content\": \"hello from the HTTP RPC\", \"tags\": [], \"created_at\": $(date +%s)}]}" |
  jq -c '{http_signed: .result}'

say "5. Sign over NIP-46: nostr-tools' BunkerSigner with the bunker:// URL"
tools="${NOSTR_TOOLS_DIR:-$HOME/.cache/keycast-walkthrough}"
if [ ! -d "$tools/node_modules/nostr-tools" ]; then
  npm install --silent --prefix "$tools" nostr-tools@2.25.2 ws@8.23.0 >&2
fi
NOSTR_TOOLS_DIR="$tools" node "$here/demo/bunker-sign.mjs" "$bunker_url" | jq -c '{nip46_signed: .event, verified}'

say "Done. Log in at $kc/login as $email (password: $password): the dashboard shows the app and what it signed."
