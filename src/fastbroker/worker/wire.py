"""The shapes of a DEALER worker's messages in FBW01 and FBW02 (docs/PROTOCOL.md
sections 4 and 13): building them, splitting a TASK of many jobs, and rewriting
queued messages when the worker changes protocol. No sockets here: ``Session``
sends and receives.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from fastbroker.protocol import (
    ANSWER_RECORD_SIZE,
    CMD_ANSWER,
    CMD_FAILED,
    MAX_BATCH,
    PEER_MAX_FRAMES,
    R_FAILED,
    R_OK,
    TASK_ID_SIZE,
    TASK_RECORD_SIZE,
    WORKER_SIGNATURE,
    WORKER_SIGNATURE_V2,
)

SIGNATURES = (WORKER_SIGNATURE, WORKER_SIGNATURE_V2)


def message(signature: bytes, command: bytes, *body: bytes) -> List[bytes]:
    """[b"", signature, command, body...], as the worker's DEALER sends it."""
    return [b"", signature, command, *body]


def split_tasks(body: Sequence[bytes]) -> Optional[List[Tuple[bytes, List[bytes]]]]:
    """The jobs of an FBW02 TASK's body [payload frames..., header]: (task id, payload
    frames) each, in order; None when the header does not match the frames."""
    if not body:
        return None
    header = bytes(body[-1])
    if not header or len(header) % TASK_RECORD_SIZE or len(header) // TASK_RECORD_SIZE > MAX_BATCH:
        return None
    jobs = []
    at = 0
    for start in range(0, len(header), TASK_RECORD_SIZE):
        count = int.from_bytes(header[start + TASK_ID_SIZE : start + TASK_RECORD_SIZE], "big")
        if count == 0:
            return None
        jobs.append((header[start : start + TASK_ID_SIZE], list(body[at : at + count])))
        at += count
    if at != len(body) - 1:
        return None
    return jobs


class AnswerBatch:
    """The outcomes of one turn of the loop, gathered into FBW02 ANSWER messages
    (at most MAX_BATCH records and PEER_MAX_FRAMES frames each)."""

    __slots__ = ("header", "frames", "messages")

    def __init__(self) -> None:
        self.header: List[bytes] = []
        self.frames: List[bytes] = []
        self.messages: List[List[bytes]] = []

    def add(self, task_id: bytes, code: bytes, frames: Sequence[bytes]) -> None:
        # [b"", signature, ANSWER, header] and the answers' frames.
        if len(self.header) >= MAX_BATCH or len(self.frames) + len(frames) + 4 > PEER_MAX_FRAMES:
            self.close()
        self.header.append(task_id + code + len(frames).to_bytes(2, "big"))
        self.frames.extend(frames)

    def close(self) -> List[List[bytes]]:
        """Finish the message being gathered; returns every message gathered so far."""
        if self.header:
            self.messages.append(message(WORKER_SIGNATURE_V2, CMD_ANSWER, b"".join(self.header), *self.frames))
            self.header = []
            self.frames = []
        return self.messages


def convert(frames: List[bytes], v2: bool) -> List[List[bytes]]:
    """A queued message rewritten in the other protocol (FBW02 if v2): the signature,
    and an ANSWER's body (FBW02 carries many outcomes in one, FBW01 one each)."""
    signature = WORKER_SIGNATURE_V2 if v2 else WORKER_SIGNATURE
    if frames[1] == signature:
        return [frames]
    if frames[2] != CMD_ANSWER:
        return [message(signature, *frames[2:])]
    if v2:  # FBW01 ANSWER [task id, answer frames...]
        batch = AnswerBatch()
        batch.add(bytes(frames[3]), R_OK, frames[4:])
        return batch.close()
    header = bytes(frames[3])
    out = []
    at = 4
    for start in range(0, len(header), ANSWER_RECORD_SIZE):
        task_id = header[start : start + TASK_ID_SIZE]
        code = header[start + TASK_ID_SIZE : start + TASK_ID_SIZE + 1]
        count = int.from_bytes(header[start + TASK_ID_SIZE + 1 : start + ANSWER_RECORD_SIZE], "big")
        command = CMD_FAILED if code == R_FAILED else CMD_ANSWER
        out.append(message(signature, command, task_id, *frames[at : at + count]))
        at += count
    return out
