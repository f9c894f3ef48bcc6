#!/usr/bin/env bash
# Creates a blob container, the one request no object-store client makes for us, with
# Azure's Shared Key authorization computed by openssl (Azurite refuses anonymous ones).
#
#   azure-create-container.sh BLOB_ENDPOINT ACCOUNT ACCOUNT_KEY CONTAINER
#
# BLOB_ENDPOINT is the account's blob service URL, e.g. Azurite's path-style
# http://127.0.0.1:10000/devstoreaccount1. Exits non-zero unless the container was created
# (201) or already existed (409).
set -euo pipefail
endpoint=${1%/} account=$2 key=$3 container=$4
date=$(LC_ALL=C TZ=GMT date '+%a, %d %b %Y %H:%M:%S GMT')
version=2021-08-06
# The canonicalized resource is /<account><URL path>: on a path-style endpoint the account
# appears twice, as Azure's Shared Key documentation says for the emulator.
path=/${endpoint#*://*/}
[ "$path" = "/$endpoint" ] && path=""
string_to_sign="PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:$date\nx-ms-version:$version\n/$account$path/$container\nrestype:container"
hex_key=$(printf %s "$key" | base64 -d | od -An -v -tx1 | tr -d ' \n')
signature=$(printf "$string_to_sign" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$hex_key" -binary | base64)
status=$(curl -sS -o /dev/null -w '%{http_code}' -X PUT "$endpoint/$container?restype=container" \
  -H "x-ms-date: $date" -H "x-ms-version: $version" -H 'Content-Length: 0' \
  -H "Authorization: SharedKey $account:$signature")
case "$status" in
  201 | 409) ;;
  *) echo "azure-create-container: creating $container at $endpoint answered $status" >&2; exit 1 ;;
esac
