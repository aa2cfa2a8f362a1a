// chat: steady one-to-one chat across nodes. Pairs of users, the first of each pair on one node
// and the second on the next, send each other messages at RATE messages per second in all for
// DURATION. End-to-end latency is measured from the message's `ts` (set by the accepting node)
// to its arrival, as a custom Trend; every conversation is checked for gaps in its seqs.
//
//   k6 run -e HTTP_URLS=http://127.0.0.1:8080,http://127.0.0.1:8081 -e PAIRS=50 -e RATE=500 \
//          -e DURATION=60s loadtest/k6/chat.js
import ws from 'k6/ws';
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import { envDuration, envInt, pairOf, registerUsers, sendFrame, sendInterval, wsUrl } from './lib/common.js';

const PAIRS = envInt('PAIRS', 10);
const RATE = envInt('RATE', 100);
const DURATION = envDuration('DURATION', '30s');
const BODY_BYTES = envInt('BODY_BYTES', 64);
const P95_MS = envInt('P95_MS', 50);
const P99_MS = envInt('P99_MS', 100);
// After DURATION, wait this long for messages still in flight before checking for gaps.
const DRAIN_MS = envInt('DRAIN_MS', 3000);

const e2e = new Trend('chat_e2e_latency', true);
const ackLatency = new Trend('chat_ack_latency', true);
const sent = new Counter('chat_messages_sent');
const acked = new Counter('chat_messages_acked');
const delivered = new Counter('chat_messages_delivered');
const missing = new Counter('chat_missing_seqs');
const sendErrors = new Rate('chat_send_errors');
const helloOk = new Rate('chat_handshake_ok');

export const options = {
  setupTimeout: '300s',
  scenarios: {
    chat: {
      executor: 'per-vu-iterations',
      vus: PAIRS * 2,
      iterations: 1,
      maxDuration: `${Math.ceil((DURATION.ms + DRAIN_MS) / 1000) + 60}s`,
    },
  },
  thresholds: {
    chat_e2e_latency: [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
    chat_send_errors: ['rate<0.01'],
    chat_handshake_ok: ['rate==1'],
    chat_missing_seqs: ['count==0'],
    chat_messages_delivered: ['count>0'],
  },
};

export function setup() {
  return { users: registerUsers(PAIRS * 2) };
}

export default function (data) {
  const { me, user, partner } = pairOf(data);
  const intervalMs = sendInterval(PAIRS, RATE);
  const padding = 'x'.repeat(Math.max(0, BODY_BYTES - 8));
  const pending = new Map();
  const seen = new Set();
  let next = 0;

  const res = ws.connect(wsUrl(me % 2, user.token), null, (socket) => {
    socket.on('message', (text) => {
      const frame = JSON.parse(text);
      const now = Date.now();
      if (frame.type === 'hello') {
        helloOk.add(true);
        // Spread the pairs' first sends over one interval.
        socket.setTimeout(() => {
          socket.setInterval(() => {
            const id = `${__VU}-${next++}`;
            pending.set(id, Date.now());
            socket.send(sendFrame(id, partner.id, padding));
            sent.add(1);
          }, intervalMs);
        }, Math.random() * intervalMs);
        socket.setTimeout(() => socket.setTimeout(() => socket.close(), DRAIN_MS), DURATION.ms);
      } else if (frame.type === 'ack') {
        const started = pending.get(frame.id);
        if (started !== undefined) {
          ackLatency.add(now - started);
          pending.delete(frame.id);
        }
        acked.add(1);
        sendErrors.add(false);
        seen.add(frame.seq);
      } else if (frame.type === 'message') {
        e2e.add(now - frame.ts);
        delivered.add(1);
        seen.add(frame.seq);
      } else if (frame.type === 'error') {
        sendErrors.add(true);
        if (frame.id) pending.delete(frame.id);
      }
    });
    socket.on('close', () => {
      // Both sides of a conversation see every seq: their own as acks, the partner's as messages.
      let max = 0;
      for (const s of seen) max = Math.max(max, s);
      missing.add(max - seen.size);
    });
  });
  check(res, { 'upgraded (101)': (r) => r && r.status === 101 }) || helloOk.add(false);
}
