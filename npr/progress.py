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


def quiet_libraries() -> None:
    """Silence the bars transformers and huggingface_hub draw on their own ("Loading weights",
    "Writing model shards", downloads): inside a command's live display they break its lines."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    logging.disable_progress_bar()
    disable_progress_bars()
