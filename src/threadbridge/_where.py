"""Where a target was when the ladder had to go past rung 1: its stack, taken from
another thread at the moment rung 2 or 3 fires.

Nothing is taken on the common path: only a target that ignored its token pays for this.
And as the rung fires, only a snapshot is taken (file, line and function of each frame:
no source read, no import), so that the rung is not held up; ``Snapshot.stack()``
formats it afterwards. Imported where targets run (worker processes, Ray tasks): it stays
light (``traceback`` is imported on first use).
"""

from __future__ import annotations

import os
import sys

# The stack is cut above the frame that called the target: what ran it (threadbridge's
# own frames, the thread's bootstrap) is not where the target was. These are the
# functions that call targets: (file name, function name).
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_CALLERS = {
    (os.path.join(_PACKAGE, "_thread.py"), "_call"),
    (os.path.join(_PACKAGE, "_host.py"), "call"),
}
# At most this many of the innermost frames are kept (a deep recursion stays readable).
MAX_FRAMES = 50

Frame = tuple[str, int, str]  # file name, line number, function name


class Snapshot:
    """A stuck target's frames, outermost first: ``line`` says where it was ("app.py:123
    in recv()"); ``stack()`` formats the frames as a traceback does, with their source."""

    __slots__ = ("_stack", "frames", "line")

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self.line = _line(frames)
        self._stack: str | None = None

    def stack(self) -> str:
        if self._stack is None:
            import traceback

            summaries = traceback.StackSummary.from_list([(*f, None) for f in self.frames])
            self._stack = "".join(summaries.format())
        return self._stack


def snapshot(thread_id: int) -> Snapshot | None:
    """The frames of the target running in ``thread_id`` now, or None if that thread
    shows none of its own."""
    frame = sys._current_frames().get(thread_id)
    frames: list[Frame] = []
    while frame is not None:
        code = frame.f_code
        frames.append((code.co_filename, frame.f_lineno or 0, code.co_name))
        frame = frame.f_back
    frames.reverse()
    for index in range(len(frames) - 1, -1, -1):
        filename, _, name = frames[index]
        # (A path relative to where the worker started, if sys.path had such an entry.)
        if (os.path.abspath(filename), name) in _CALLERS:
            frames = frames[index + 1 :]
            break
    if not frames:
        return None  # between the target's calls, or ended: nothing of its own
    return Snapshot(frames[-MAX_FRAMES:])


def _said(frame: Frame) -> str:
    filename, lineno, name = frame
    return f"{os.path.basename(filename)}:{lineno} in {name}()"


def _line(frames: list[Frame]) -> str:
    """The innermost frame; if that is in the standard library (a lock's wait, a
    socket's recv), the innermost of the program's own frames first, then it."""
    innermost = frames[-1]
    if not _in_stdlib(innermost[0]):
        return _said(innermost)
    for frame in reversed(frames):
        if not _in_stdlib(frame[0]):
            return f"{_said(frame)}, in {_said(innermost)}"
    return _said(innermost)


_STDLIB = os.path.dirname(os.path.abspath(os.__file__)) + os.sep


def _in_stdlib(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_STDLIB) and "site-packages" not in path


def _frames_of(stack: str) -> list[Frame]:
    """The frames of a stack that ``Snapshot.stack()`` formatted."""
    frames: list[Frame] = []
    for text in stack.splitlines():
        parts = text.strip().split('"')
        if len(parts) == 3 and parts[0] == "File ":
            rest = parts[2].split(", ")  # ', line 123, in recv'
            if len(rest) == 3 and rest[1].startswith("line ") and rest[2].startswith("in "):
                lineno = int(rest[1][5:]) if rest[1][5:].isdigit() else 0
                frames.append((parts[1], lineno, rest[2][3:]))
    return frames


def line_of(stack: str) -> str | None:
    """What ``Snapshot.line`` says of a stack that ``Snapshot.stack()`` formatted; None
    if it is not such a stack."""
    frames = _frames_of(stack)
    return _line(frames) if frames else None


def frame_of(stack: str) -> tuple[str | None, int | None, str | None]:
    """(file, line, function) of the frame that ``line_of()`` names first: the program's
    own innermost one; Nones if ``stack`` is not a formatted stack."""
    frames = _frames_of(stack)
    for frame in reversed(frames):
        if not _in_stdlib(frame[0]):
            return frame
    return frames[-1] if frames else (None, None, None)
