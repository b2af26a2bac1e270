"""Broadcast peer on Python `websockets` (new asyncio implementation).

Follows the "Broadcasting" topic guide of the websockets docs: the handler
keeps every open connection in a set and relays each received message with
``websockets.asyncio.server.broadcast()``, which queues one copy per connection
without waiting (no backpressure). The sender is in the set, so it gets its
own message too.

Deliberate settings (see README.md): permessage-deflate is switched off
(``compression=None``) because the other peers do not negotiate it; any path
upgrades; ``GET /health`` (without an Upgrade header) answers 200.
"""

import asyncio
import os
import signal
import sys

from websockets.asyncio.server import broadcast, serve

CLIENTS = set()


async def relay(websocket):
    CLIENTS.add(websocket)
    try:
        async for message in websocket:
            broadcast(CLIENTS, message)
    except Exception:
        # A connection that breaks mid-read just leaves the room.
        pass
    finally:
        CLIENTS.discard(websocket)


def health(connection, request):
    path = request.path.split("?", 1)[0]
    if path == "/health" and "Upgrade" not in request.headers:
        return connection.respond(200, "ok\n")
    return None  # carry on with the WebSocket handshake


async def main():
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "9001"))
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    async with serve(relay, host, port, process_request=health, compression=None) as server:
        bound = server.sockets[0].getsockname()
        print(f"python-websockets peer listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main())
