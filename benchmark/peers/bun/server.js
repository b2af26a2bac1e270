// Broadcast peer on Bun's built-in WebSocket server (uWebSockets inside),
// after Bun's "Build a publish-subscribe WebSocket server" guide: every socket
// subscribes to one topic on open, and each received message is published to
// that topic with server.publish(). Unlike ws.publish(), server.publish() is
// not sent *from* a socket, so every subscriber, the sender included, gets it.
// Additions: GET /health -> 200 and host/port from the environment.

const TOPIC = "room";
const host = process.env.HOST || "127.0.0.1";
const port = Number(process.env.PORT || 9001);

const server = Bun.serve({
  hostname: host,
  port,
  fetch(req, srv) {
    const { pathname } = new URL(req.url);
    if (pathname === "/health" && req.headers.get("upgrade") === null) {
      return new Response("ok\n");
    }
    // Any path upgrades; the query string is ignored.
    if (srv.upgrade(req)) return undefined;
    return new Response("WebSocket upgrade required\n", { status: 426 });
  },
  websocket: {
    open(ws) {
      ws.subscribe(TOPIC);
    },
    message(ws, message) {
      server.publish(TOPIC, message);
    },
    close(ws) {
      ws.unsubscribe(TOPIC);
    },
  },
});

console.error(`bun peer listening on ${server.hostname}:${server.port}`);

function stop() {
  server.stop(true);
  process.exit(0);
}
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
