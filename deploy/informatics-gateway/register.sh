#!/usr/bin/env bash
# Register the onevlm-router configuration with a MONAI Deploy Informatics Gateway (research use only).
#
#   deploy/informatics-gateway/register.sh GATEWAY_URL [WORKFLOW_ID]
#
# GATEWAY_URL  the gateway's REST API, e.g. http://mig.example.org:5000
# WORKFLOW_ID  optional: the ID the Workflow Manager returned for onevlm-router-workflow.json. Without it the AE
#              is registered with "workflows": [] and the Workflow Manager picks the workflow by AE title
#              (the workflow's informatics_gateway.ae_title, ONEVLM).
#
# POSTs, in order: source.json -> /config/source, destination-*.json -> /config/destination, ae.json -> /config/ae.
# The source goes first because the Workflow Manager checks the workflow's data_origins against it.
# An entity that already exists (HTTP 409) is reported and left as it is; use PUT on the same path to change it,
# with the whole body: the gateway resets what a PUT leaves out (for an AE, ignoredSopClasses, the SR loop guard).
# Edit hostIp/port/aeTitle in the JSON files for your site first. Needs bash and curl.
set -euo pipefail

usage() { echo "usage: $0 GATEWAY_URL [WORKFLOW_ID]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
gateway="${1%/}"
workflow_id="${2:-}"
[[ "$gateway" =~ ^https?://[^[:space:]]+$ ]] || { echo "GATEWAY_URL must start with http:// or https://" >&2; exit 2; }
if [[ -n "$workflow_id" && ! "$workflow_id" =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "WORKFLOW_ID may contain only letters, digits, '.', '_' and '-'" >&2; exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failed=0

post() {  # post API_PATH JSON_FILE
    local path="$1" body="$2" code
    code="$(curl -sS -o "$tmp/response" -w '%{http_code}' -X POST "$gateway$path" \
        -H 'Content-Type: application/json' --data-binary "@$body")" || code="000"
    case "$code" in
        200|201) echo "POST $path $(basename "$body"): $code created" ;;
        409)     echo "POST $path $(basename "$body"): 409 already exists (left unchanged; PUT $path with the whole body to update)" ;;
        *)       echo "POST $path $(basename "$body"): HTTP $code" >&2
                 [[ -s "$tmp/response" ]] && cat "$tmp/response" >&2 && echo >&2
                 failed=1 ;;
    esac
}

ae_body="$here/ae.json"
if [[ -n "$workflow_id" ]]; then
    ae_body="$tmp/ae.json"
    sed "s/\"workflows\": \[\]/\"workflows\": [\"$workflow_id\"]/" "$here/ae.json" > "$ae_body"
    grep -q "\"$workflow_id\"" "$ae_body" || { echo "could not put the workflow ID into ae.json" >&2; exit 1; }
fi

post /config/source "$here/source.json"
post /config/destination "$here/destination-pacs.json"
post /config/destination "$here/destination-review.json"
post /config/ae "$ae_body"

exit "$failed"
