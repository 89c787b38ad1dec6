"""Header names of the wire contract."""

from __future__ import annotations

CONTENT_TYPE = "Content-Type"
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
REPLY_TO = "Fn-Reply-To"
CALL_ID = "Fn-Call-Id"
FUNCTION = "Fn-Function"
ATTEMPT = "Fn-Attempt"
SCHEDULE = "Fn-Schedule"
SCHEDULED_AT = "Fn-Scheduled-At"
SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"

# dead letters
ORIGINAL_SUBJECT = "Fn-Original-Subject"
ORIGINAL_SEQ = "Fn-Original-Seq"
DELIVERIES = "Fn-Deliveries"
REASON = "Fn-Reason"
ERROR = "Fn-Error"
FAILED_AT = "Fn-Failed-At"
BODY_REF = "Fn-Body-Ref"
BODY_SIZE = "Fn-Body-Size"
DROPPED_HEADERS = "Fn-Dropped-Headers"
MSG_SIZE = "Nats-Msg-Size"  # what JetStream puts in place of the body for a headers-only consumer
