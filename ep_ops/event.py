"""``EventOverlap``: DeepEP's event wrapper for overlapping communication with compute."""

import torch


class EventOverlap:
    """An event marking the end of a communication call, and the tensors to keep alive until it.

    ep_ops launches every op on the current stream, so an event only matters to work on other
    streams: ``current_stream_wait()`` makes the current stream wait for it. Without an event
    (CPU tensors, or ``async_finish=False``) the work is already ordered before anything the
    caller issues next, and waiting is a no-op.

    Arguments:
        event: a ``torch.cuda.Event`` (or ``torch.Event``, or any object with a
            ``current_stream_wait()`` method, like DeepEP's ``EventHandle``), or None.
        extra_tensors: tensors to keep alive until the event has been waited on.
    """

    def __init__(self, event=None, extra_tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event (no-op without one)."""
        if self.event is None:
            return
        wait = getattr(self.event, "current_stream_wait", None)
        if wait is not None:
            wait()
        else:
            self.event.wait()  # torch.cuda.Event / torch.Event: the current stream waits

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.current_stream_wait()
