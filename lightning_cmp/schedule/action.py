"""The action vocabulary every schedule is written in: small, immutable and printable."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["REPLICA_NAMES", "Action", "Cell", "Kind", "Program"]

#: Replica 0 is "A" (stage s on rank s), replica 1 is "B" (placed in reverse).
REPLICA_NAMES = "AB"

#: A place in a timetable or a program: (rank, slot).
Cell = tuple[int, int]


class Kind(enum.Enum):
    """What an action does. Compute kinds come from a schedule; the rest are inserted by lowering."""

    FORWARD = "F"
    BACKWARD = "B"
    SEND_ACT = "SEND_ACT"  # send a forward output to the rank holding the next stage
    RECV_ACT = "RECV_ACT"  # receive a forward input from the rank holding the previous stage
    SEND_GRAD = "SEND_GRAD"  # send an input gradient to the rank holding the previous stage
    RECV_GRAD = "RECV_GRAD"  # receive an output gradient from the rank holding the next stage
    LOSS = "LOSS"  # the user's loss of (replica, microbatch) on the last stage's rank: its output gradient
    OUTPUT = "OUTPUT"  # collective: the last stage's output of (replica, microbatch) reaches every rank
    AVERAGE = "AVERAGE"  # start averaging this stage copy with its mirror copy (peer may be this rank)
    WAIT_AVERAGE = "WAIT_AVERAGE"  # finish every averaging started in this step
    SEND_OUT = "SEND_OUT"  # asynchronous schedules: send a last-stage output to a rank that runs the user's loss
    RECV_OUT = "RECV_OUT"  # asynchronous schedules: receive a mini-batch's output from the last stage's rank

    def __lt__(self, other: object) -> bool:
        """Declaration order, so that ``Action`` (``order=True``) can sort actions of different kinds."""
        if not isinstance(other, Kind):
            return NotImplemented
        members = list(Kind)
        return members.index(self) < members.index(other)

    @property
    def is_compute(self) -> bool:
        return self in (Kind.FORWARD, Kind.BACKWARD)

    @property
    def is_send(self) -> bool:
        return self in (Kind.SEND_ACT, Kind.SEND_GRAD, Kind.SEND_OUT)

    @property
    def is_recv(self) -> bool:
        return self in (Kind.RECV_ACT, Kind.RECV_GRAD, Kind.RECV_OUT)


_PATTERN = re.compile(
    r"^(?P<kind>[A-Z_]+)(?:\.(?P<replica>[AB])(?P<stage>\d+)\.m(?P<mb>\d+))?(?:(?P<dir>->|<-|<->)(?P<peer>\d+))?$"
)


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: ``kind`` applied to ``stage`` of ``replica`` on ``microbatch``.

    ``peer`` is the other rank of a send, receive or averaging exchange. ``str(action)`` is compact and
    `parse` reads it back.

    Examples:
        >>> a = Action(Kind.SEND_ACT, replica=1, stage=2, microbatch=0, peer=1)
        >>> str(a)
        'SEND_ACT.B2.m0->1'
        >>> Action.parse(str(a)) == a
        True
    """

    kind: Kind
    replica: int = 0
    stage: int = 0
    microbatch: int = 0
    peer: int | None = None

    def __str__(self) -> str:
        if self.kind is Kind.WAIT_AVERAGE:
            return str(self.kind.value)
        text = f"{self.kind.value}.{REPLICA_NAMES[self.replica]}{self.stage}.m{self.microbatch}"
        if self.peer is None:
            return text
        arrow = "->" if self.kind.is_send else "<-" if self.kind.is_recv else "<->"
        return f"{text}{arrow}{self.peer}"

    @property
    def short(self) -> str:
        """Label for timetables: ``FA0`` (forward, replica A, stage 0); microbatch appended when > 0."""
        mb = f".{self.microbatch}" if self.microbatch else ""
        return f"{self.kind.value}{REPLICA_NAMES[self.replica]}{self.stage}{mb}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Inverse of ``str(action)``; raises ``ValueError`` naming the text that does not parse."""
        match = _PATTERN.match(text.strip())
        if match is None or match["kind"] not in Kind._value2member_map_:
            raise ValueError(f"{text!r} is not an action; expected e.g. 'F.A0.m0' or 'SEND_ACT.B2.m0->1'")
        kind = Kind(match["kind"])
        if match["replica"] is None:
            return cls(kind)
        peer = int(match["peer"]) if match["peer"] is not None else None
        return cls(kind, REPLICA_NAMES.index(match["replica"]), int(match["stage"]), int(match["mb"]), peer)


#: A lowered schedule: rank -> the actions it executes, in order.
Program = dict[int, list[Action]]
