"""The stream rule: forwards that share state (a layer's call count and status on
``all_to_all``; a workspace's buffers, epoch and side stream on ``nvlink``) run in the
order the host issued them, whatever CUDA stream each was issued on.

A forward issued on another stream than the previous one makes its stream wait for the
previous forward's end (an event: no host sync). Inside a CUDA-graph capture nothing is
recorded or waited for (``torch.cuda.graph`` synchronises the device before it captures);
replays are ordered by the stream the caller replays them on.
"""
from __future__ import annotations

import torch


class StreamOrder:
    def __init__(self):
        self._stream = None
        self._done = None

    def enter(self, device: torch.device) -> None:
        if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return
        stream = torch.cuda.current_stream(device)
        if self._stream is not None and self._stream != stream:
            stream.wait_event(self._done)

    def exit(self, device: torch.device) -> None:
        if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return
        stream = torch.cuda.current_stream(device)
        if self._done is None:
            self._done = torch.cuda.Event()
        self._done.record(stream)
        self._stream = stream
