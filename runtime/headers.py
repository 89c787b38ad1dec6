"""Header names of the wire contract."""

from __future__ import annotations

CONTENT_TYPE = "Content-Type"
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
REPLY_TO = "Fn-Reply-To"
CALL_ID = "Fn-Call-Id"
FUNCTION = "Fn-Function"
SCHEDULE = "Fn-Schedule"
SCHEDULED_AT = "Fn-Scheduled-At"
SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
ENDPOINT = "Fn-Endpoint"   # set by the gateway: the invocation came through this micro endpoint

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

# set by the server on what it delivers
STATUS = "Status"                     # a status message (heartbeat, end of a pull) instead of a delivery
DESCRIPTION = "Description"
PENDING_MESSAGES = "Nats-Pending-Messages"   # what a pull left undelivered

# Publish conditions and stream directives: they concern the stream a message was first
# published to, never one it is copied to later (a dead letter, a replay).
NOT_CARRIED_OVER = frozenset({
    MSG_ID, "Nats-Expected-Stream", "Nats-Expected-Last-Msg-Id", "Nats-Expected-Last-Sequence",
    EXPECTED_LAST_SUBJECT_SEQ, "Nats-Rollup", "Nats-TTL", STATUS, DESCRIPTION,
})
