"""Running the user's code for a job and turning what it returns or raises into the
job's outcome: shared by both sessions (the pure ``session.Session`` and the compiled
``_session.Session``), which differ only in how jobs reach a thread and outcomes leave it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Sequence, Tuple

from fastbroker.protocol import PEER_MAX_FRAMES

log = logging.getLogger("fastbroker.worker")

FAILED_TEXT_LIMIT = 2000
"""Characters of an exception's message sent in FAILED (the full traceback is logged)."""

MAX_ANSWER_FRAMES = PEER_MAX_FRAMES - 4
"""Frames of one answer: what an ANSWER message can carry besides its own four
([b"", signature, ANSWER, task id])."""

ANSWER_ZERO_COPY_MIN = 65536
"""Answer frames of at least this many bytes are sent from the job's own ``bytes`` object,
not a copy (the compiled session; below it, a copy costs less than the bookkeeping)."""

# A job's outcome: (answer frames, None) or (None, (exception type name, message)).
Outcome = Tuple[Optional[List[bytes]], Optional[Tuple[str, str]]]


def failure(exc: BaseException) -> Tuple[str, str]:
    """What FAILED reports of an exception: its type's name and its message, cut."""
    return type(exc).__name__, str(exc)[:FAILED_TEXT_LIMIT]


def direct_process(worker: Any) -> Optional[Callable[[Any], Any]]:
    """The worker's ``process`` when its ``process_multipart`` is the default one (which
    only joins the frames and calls it): run_one then calls it itself, a Python call and
    a list less per job. None otherwise."""
    from fastbroker.worker.base import WorkerBase  # (base builds on this module)

    if getattr(
        type(worker), "process_multipart", None
    ) is WorkerBase.process_multipart and "process_multipart" not in vars(worker):
        # Looked up once: a `process` assigned to the worker after its session started
        # is not seen (the default process_multipart looked it up at every job).
        process: Callable[[Any], Any] = worker.process
        return process
    return None


def run_one(
    worker: Any,
    task_id: bytes,
    payload: List[bytes],
    session: Any,
    number: int,
    process: Optional[Callable[[Any], Any]] = None,
) -> Outcome:
    """``worker.process_multipart(payload)`` as one job's outcome; never raises. `session`
    and `number` say whether it was cancelled (``session.job_cancelled``), asked only
    when it raised. `process`: direct_process(worker), if not None."""
    try:
        if process is not None:
            # What the default process_multipart does, without its call.
            result = process(payload[0] if len(payload) == 1 else b"".join(payload))
            if type(result) is bytes and result:
                return [result], None  # the common answer: one frame, checked
            frames: Sequence[Any] = [result]
        else:
            frames = worker.process_multipart(payload)
        answer = [bytes(frame) for frame in frames]
        if not answer:
            raise ValueError("process_multipart returned no frames")
        if len(answer) > MAX_ANSWER_FRAMES:
            raise ValueError(f"process_multipart returned {len(answer)} frames; at most {MAX_ANSWER_FRAMES}")
        if answer == [b""]:
            log.warning("job %s: the answer is one empty frame, which clients read as an abort", task_id.hex())
        return answer, None
    except BaseException as exc:  # anything the job raises is the job's failure, not the worker's
        if session.job_cancelled(number, task_id):
            # The expected way for a job to stop early: no traceback.
            log.info("job %s stopped after its cancellation (%s); reporting FAILED", task_id.hex(), type(exc).__name__)
        else:
            log.exception("job %s: processing failed; reporting FAILED so the broker retries it", task_id.hex())
        return None, failure(exc)


def run_batch(worker: Any, payloads: Sequence[List[bytes]]) -> List[Outcome]:
    """``worker.process_batch`` over several jobs (each one's frames joined), one
    outcome per job in order; never raises (if it raises, every job FAILED)."""
    try:
        answers = list(worker.process_batch([b"".join(payload) for payload in payloads]))
        if len(answers) != len(payloads):
            raise ValueError(f"process_batch returned {len(answers)} answers for {len(payloads)} jobs")
    except BaseException as exc:  # the batch's failure is each job's
        log.exception("a batch of %d job(s) failed; reporting each FAILED so the broker retries it", len(payloads))
        error = failure(exc)
        return [(None, error)] * len(payloads)
    return [
        (None, failure(answer)) if isinstance(answer, BaseException) else ([bytes(answer)], None) for answer in answers
    ]
