"""Header names of the wire contract."""

from __future__ import annotations

CONTENT_TYPE = "Content-Type"
MSG_ID = "Nats-Msg-Id"
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
