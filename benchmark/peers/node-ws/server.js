'use strict';
// Broadcast peer on Node + the `ws` package, after the "Server broadcast"
// example in ws's README (the variant that includes the sender). The only
// additions: an http.Server in front so that `GET /health` answers 200, and
// host/port from the environment. Every path upgrades; the query is ignored.

const http = require('node:http');
const { WebSocketServer, WebSocket } = require('ws');

const host = process.env.HOST || '127.0.0.1';
const port = Number(process.env.PORT || 9001);

const httpServer = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (req.method === 'GET' && path === '/health') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok\n');
    return;
  }
  res.writeHead(426, { 'content-type': 'text/plain' });
  res.end('WebSocket upgrade required\n');
});

// No `path` option: ws accepts the upgrade on any URL.
const wss = new WebSocketServer({ server: httpServer });

wss.on('connection', (socket) => {
  socket.on('error', (err) => console.error('socket error:', err.message));
  socket.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    }
  });
});

httpServer.listen(port, host, () => {
  const addr = httpServer.address();
  console.error(`node-ws peer listening on ${addr.address}:${addr.port}`);
});

function stop() {
  wss.close();
  httpServer.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
  for (const client of wss.clients) client.terminate();
}
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
