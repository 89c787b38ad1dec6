"""Header names of the wire contract."""

from __future__ import annotations

CONTENT_TYPE = "Content-Type"
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
REPLY_TO = "Fn-Reply-To"
CALL_ID = "Fn-Call-Id"
# On a call: its caller subscribes to the call's subject in fn_results. When the outcome is
# stored, the stored message is the answer, and nothing more goes to Fn-Reply-To.
WATCHES_OUTCOME = "Fn-Watches-Outcome"
FUNCTION = "Fn-Function"
SCHEDULE = "Fn-Schedule"
SCHEDULED_AT = "Fn-Scheduled-At"
SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
PRIORITY = "Fn-Priority"   # on a fn.call request: the level (1-10) to queue the invocation at
ENDPOINT = "Fn-Endpoint"   # set by the gateway: the invocation came through this micro endpoint
TTL = "Fn-TTL"             # how long the invocation may wait in the queue: a duration (30s) or seconds
PROGRESS_TO = "Fn-Progress-To"   # on a call: where the function's progress updates go (core NATS, not stored)
PROGRESS = "Fn-Progress"         # on an update: its number within the attempt, from 1
ATTEMPT = "Fn-Attempt"           # on an update: the attempt that sent it, from 1
TRIGGER = "Fn-Trigger"           # on an event's dead letter and its replay: the trigger that ran it
EVENT_SUBJECT = "Fn-Event-Subject"   # on those too: the event's subject (ctx.subject of the replay)
CACHE = "Fn-Cache"               # on an answer: "hit" (from the result cache); on a call: "bypass" (run it anyway)
MSG_TTL = "Nats-TTL"             # on a write to a stream that allows message TTLs: how long the server keeps it
TIME_STAMP = "Nats-Time-Stamp"   # set by the server on a direct get: when the message was stored

# delayed calls (the server's message scheduler): set on a call in FN_DELAYED
NATS_SCHEDULE = "Nats-Schedule"                 # "@at <RFC 3339>": when the server queues the call
SCHEDULE_TARGET = "Nats-Schedule-Target"        # fn.due.<function>[.<level>]: where it queues it
SCHEDULE_TTL = "Nats-Schedule-TTL"              # how long the copy it publishes stays in FN_DELAYED
SCHEDULER = "Nats-Scheduler"                    # set on that copy: the subject of the delayed call
STREAM_SOURCE = "Nats-Stream-Source"            # set on what FN sources: where it came from

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

# on the marker a replay leaves in fn_results in place of the call's cleared outcome
REPLAYED_AT = "Fn-Replayed-At"       # RFC 3339 UTC, milliseconds
REPLAYED_FROM = "Fn-Replayed-From"   # the sequence of the dead letter that was replayed
MSG_SIZE = "Nats-Msg-Size"  # what JetStream puts in place of the body for a headers-only consumer

# set by the server on what it delivers
STATUS = "Status"                     # a status message (heartbeat, end of a pull) instead of a delivery
DESCRIPTION = "Description"
PENDING_MESSAGES = "Nats-Pending-Messages"   # what a pull left undelivered

# Publish conditions and stream directives: they concern the stream a message was first
# published to, never one it is copied to later (a dead letter, a replay).
NOT_CARRIED_OVER = frozenset({
    MSG_ID, "Nats-Expected-Stream", "Nats-Expected-Last-Msg-Id", "Nats-Expected-Last-Sequence",
    EXPECTED_LAST_SUBJECT_SEQ, "Nats-Rollup", MSG_TTL, STATUS, DESCRIPTION,
    # A copy keeping these would be scheduled again, or would mislead FN about how far it has
    # sourced FN_DELAYED (it reads that position back from this header).
    NATS_SCHEDULE, SCHEDULE_TARGET, SCHEDULE_TTL, "Nats-Schedule-Next", STREAM_SOURCE,
})
