"""Whether an HTTP request's client is still there: what the server's ``receive`` says."""

from __future__ import annotations

import trio

from .asgi import Message, Receive

READ_AHEAD = 16
"""Messages a `ClientWatch` reads ahead of the app: enough for the request body of
a streaming endpoint that never reads it; a larger upload waits for the app."""


class ClientWatch:
    """Whether the client of one HTTP request has gone away, as far as can be known.

    Hypercorn drops what an app sends after its client disconnected, silently; only
    ``receive`` tells, with ``http.disconnect``. The app's own reads are watched; and
    while a response streams and the app is not reading, a system task reads in its
    stead (a few messages ahead at most) and passes on what it read when the app asks.
    """

    __slots__ = ("_listener", "_listening", "_reading", "_receive", "_relay", "gone")

    def __init__(self, receive: Receive, *, listening: bool) -> None:
        self._receive = receive
        self._listening = listening  # False: only the app's own reads are watched
        self.gone = False
        self._reading = False
        self._listener: trio.CancelScope | None = None
        self._relay: trio.MemoryReceiveChannel[Message | Exception] | None = None

    async def receive(self) -> Message:
        """The ``receive`` the app gets."""
        if self._relay is not None:  # the listener reads in the app's stead
            try:
                message = await self._relay.receive()
            except trio.EndOfChannel:  # it heard the disconnect, and passed it on
                return {"type": "http.disconnect"}
            if isinstance(message, Exception):
                raise message
            return message
        self._reading = True
        try:
            message = await self._receive()
        finally:
            self._reading = False
        self.gone = message["type"] == "http.disconnect"
        return message

    def listen(self) -> None:
        """A response is streaming: listen for the disconnect, unless the app does."""
        if self._listening and self._relay is None and not (self._reading or self.gone):
            relay, self._relay = trio.open_memory_channel[Message | Exception](READ_AHEAD)
            self._listener = trio.CancelScope()
            # A system task: no nursery on every request's path for this rare need.
            trio.lowlevel.spawn_system_task(self._listen, self._listener, relay)

    def close(self) -> None:
        """The request is over: stop listening."""
        if self._listener is not None:
            self._listener.cancel()

    async def _listen(
        self, scope: trio.CancelScope, relay: trio.MemorySendChannel[Message | Exception]
    ) -> None:
        with scope, relay:
            while not self.gone:
                try:
                    message = await self._receive()
                except Exception as exc:  # a system task must not raise: the app will see it
                    await relay.send(exc)
                    return
                self.gone = message["type"] == "http.disconnect"
                await relay.send(message)
