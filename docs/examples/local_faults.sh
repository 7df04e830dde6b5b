# URL, KEY_ID and KEY_SECRET as `prefect-raydog local start` prints them.
curl -s -X POST "$URL/_local/faults" \
    -H "Authorization: yd-key $KEY_ID:$KEY_SECRET" -H "Content-Type: application/json" \
    -d '{"kind": "429", "path": "/work/requirements", "method": "POST", "retryAfterSeconds": 2}'
