"""The exit codes of the ``runtime`` command, named once for every subcommand and for ``serve``'s signals."""

from __future__ import annotations

RET_OK = 0
RET_ERROR = 1            # a runtime error: bad manifest, cannot connect, no such dead letter, …
RET_USAGE = 2            # argparse's own code for bad arguments
RET_FAILED = 3           # the invocation ran and failed
RET_NO_RESULT = 4        # result: the call's outcome is not stored (yet)
RET_CONNECTION_LOST = 5  # serve: the NATS connection closed for good; a supervisor should restart it
RET_DECLINED = 6         # a destructive command was not confirmed (answered no, or no terminal and no --yes)
RET_NOT_FOUND = 7        # history, rollback: no such function or schedule, or no such revision of it
RET_QUEUE_FULL = 8       # invoke: the function's queue is at its limit (max_queued); the call was not stored
RET_NOT_PENDING = 9       # cancel: no delayed call of that id is waiting (unknown, or queued already)
RET_AUTH = 10            # the server refused the credentials or the certificate (or they expired)
RET_PERMISSION = 11      # the server refused a publish or subscription for lack of permission
RET_INTERRUPTED = 130
