"""Progress bars: a stage draws its own bar, none, or a task on a display shared by a pipeline."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def bar(label: str, progress):
    """Yield a rich Progress to add tasks to. `progress`: True (own transient bar), False (hidden)
    or a live Progress owned by the caller (tasks added here are removed on exit)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if isinstance(progress, Progress):
        before = set(progress.task_ids)
        try:
            yield progress
        finally:
            for t in set(progress.task_ids) - before:
                progress.remove_task(t)
        return
    cols = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, TimeRemainingColumn(), disable=not progress, transient=True) as p:
        yield p
