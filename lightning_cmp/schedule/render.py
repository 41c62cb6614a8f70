"""ASCII grids of timetables and lowered programs, for docs and error messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lightning_cmp.schedule.action import Action, Cell

__all__ = ["render", "render_program"]


def _mark(text: str, marked: bool) -> str:
    return f">>{text}<<" if marked else text


def _grid(corner: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    """Lay out labelled rows of cells with every cell padded to the widest one."""
    width = max([len(c) for c in columns] + [len(c) for _, cells in rows for c in cells])
    label_width = max([len(corner)] + [len(label) for label, _ in rows])

    def line(label: str, cells: Sequence[str]) -> str:
        return " ".join([label.ljust(label_width)] + [c.ljust(width) for c in cells]).rstrip()

    return "\n".join([line(corner, columns)] + [line(label, cells) for label, cells in rows])


def render(timetable: Mapping[int, Sequence[Action | None]], mark: Cell | None = None) -> str:
    """Ranks as rows, slots as columns; ``.`` is idle, ``mark=(rank, slot)`` shows as ``>>FA1<<``.

    Examples:
        >>> from lightning_cmp.schedule.mp import mp
        >>> print(render(mp(2)))
        slot    0   1   2   3
        rank 0: FA0 .   .   BA0
        rank 1: .   FA1 BA1 .
    """
    num_slots = max((len(slots) for slots in timetable.values()), default=0)
    rows = [
        (f"rank {rank}:", [_mark(a.short if a else ".", (rank, i) == mark) for i, a in enumerate(slots)])
        for rank, slots in sorted(timetable.items())
    ]
    return _grid("slot", [str(i) for i in range(num_slots)], rows)


def render_program(
    program: Mapping[int, Sequence[Action | None]], mark: Cell | None = None, *, marks: Iterable[Cell] = ()
) -> str:
    """Lowered per-rank streams: one column per rank, one row per step (streams are long and narrow).

    ``mark=(rank, step)`` (or several in ``marks``) highlights cells as ``>>F.A1.m0<<``.

    Examples:
        >>> from lightning_cmp.schedule.action import Kind
        >>> print(render_program({0: [Action(Kind.FORWARD)], 1: []}, mark=(0, 0)))
        step rank 0      rank 1
        0:   >>F.A0.m0<<
    """
    marked = set(marks) | ({mark} if mark else set())
    ranks = sorted(program)
    length = max((len(program[r]) for r in ranks), default=0)

    def cell(rank: int, step: int) -> str:
        if step >= len(program[rank]):
            return ""
        action = program[rank][step]
        return _mark(str(action) if action else ".", (rank, step) in marked)

    rows = [(f"{step}:", [cell(r, step) for r in ranks]) for step in range(length)]
    return _grid("step", [f"rank {r}" for r in ranks], rows)
