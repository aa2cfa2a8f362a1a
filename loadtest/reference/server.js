// The reference stack our benchmarks compare against: a minimal Socket.IO server with the Redis
// adapter (the stack the origin app used) doing the gateway's job on the same machine:
// authenticate with the same HS256 JWT, send to a user, deliver across nodes through Redis.
// It stores nothing; ours appends every message to a Redis stream before it acks.
// Rooms (the harness's `rooms` workload): a client names one room in its CONNECT auth and is
// trusted to be a member (ours checks membership in Postgres); a `send` with `room` instead of
// `to` goes to the room's other members on every node.
//
// Usage: JWT_SECRET=... PORT=3001 REDIS_URL=redis://127.0.0.1:6379 node server.js
'use strict';

const { createServer } = require('node:http');
const { randomUUID } = require('node:crypto');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');
const jwt = require('jsonwebtoken');

const port = Number(process.env.PORT || 3001);
const secret = process.env.JWT_SECRET;
const redisUrl = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const adapterKey = process.env.REDIS_KEY || 'socket.io-bench';
const maxBody = 4096;

if (!secret) {
  console.error('JWT_SECRET is required');
  process.exit(2);
}

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  for (const client of [pub, sub]) client.on('error', (e) => console.error('redis:', e.message));
  await Promise.all([pub.connect(), sub.connect()]);

  const httpServer = createServer((req, res) => {
    res.writeHead(req.url === '/healthz' ? 200 : 404).end();
  });
  const io = new Server(httpServer, {
    transports: ['websocket'],
    serveClient: false,
    perMessageDeflate: false,
    maxHttpBufferSize: 16 * 1024,
    adapter: createAdapter(pub, sub, { key: adapterKey }),
  });

  io.use((socket, next) => {
    try {
      const token = socket.handshake.auth && socket.handshake.auth.token;
      const claims = jwt.verify(token, secret, { algorithms: ['HS256'] });
      socket.data.userId = claims.sub;
      const room = socket.handshake.auth.room;
      socket.data.room = typeof room === 'string' && room.length <= 64 ? room : null;
      next();
    } catch {
      next(new Error('unauthorized'));
    }
  });

  io.on('connection', (socket) => {
    const userId = socket.data.userId;
    socket.join(`user:${userId}`);
    if (socket.data.room) socket.join(`room:${socket.data.room}`);
    socket.on('send', (msg, ack) => {
      if (typeof ack !== 'function') return;
      const toRoom = msg && typeof msg.room === 'string';
      if (!msg || typeof msg.id !== 'string' || (typeof msg.to !== 'string' && !toRoom)
          || typeof msg.body !== 'string' || msg.body.length === 0 || msg.body.length > maxBody) {
        ack({ type: 'error', code: 'bad_request' });
        return;
      }
      if (toRoom) {
        if (msg.room !== socket.data.room) {
          ack({ type: 'error', id: msg.id, code: 'forbidden' });
          return;
        }
        const frame = {
          type: 'message', msg_id: randomUUID(), from: userId, room: msg.room, body: msg.body, ts: Date.now(),
        };
        // Like the gateway: every member's connections but the sending one.
        socket.to(`room:${msg.room}`).emit('message', frame);
        ack({ type: 'ack', id: msg.id, msg_id: frame.msg_id, ts: frame.ts });
        return;
      }
      const frame = {
        type: 'message', msg_id: randomUUID(), from: userId, to: msg.to, body: msg.body, ts: Date.now(),
      };
      // Like the gateway: the recipient's devices and the sender's other devices.
      socket.to([`user:${msg.to}`, `user:${userId}`]).emit('message', frame);
      ack({ type: 'ack', id: msg.id, msg_id: frame.msg_id, ts: frame.ts });
    });
  });

  httpServer.listen(port, '127.0.0.1', () => console.log(`reference socket.io node on 127.0.0.1:${port}`));

  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).finally(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

// Under overload the adapter's Redis requests can time out; a production deployment logs that
// and keeps serving rather than letting Node's default handler end the process.
process.on('unhandledRejection', (e) => console.error('unhandled rejection:', e && e.message));

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
