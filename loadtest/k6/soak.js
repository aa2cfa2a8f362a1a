// soak: hours of mixed traffic. Pairs of users chat at a low steady RATE across nodes; every
// RECONNECT_EVERY each connection closes and reconnects (to a different node than before), and
// each VU reads its profile over HTTP now and then. Watch the gateway's memory, open
// connections and error counters on the dashboard while it runs; the thresholds catch errors
// and latency drift. DURATION defaults to 2h; CI runs it for seconds.
//
//   k6 run -e HTTP_URLS=http://127.0.0.1:8080,http://127.0.0.1:8081 -e PAIRS=100 -e RATE=200 \
//          -e DURATION=2h loadtest/k6/soak.js
import http from 'k6/http';
import ws from 'k6/ws';
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import { HTTP_URLS, envDuration, envInt, pairOf, registerUsers, sendFrame, sendInterval, wsUrl } from './lib/common.js';

const PAIRS = envInt('PAIRS', 20);
const RATE = envInt('RATE', 40);
const DURATION = envDuration('DURATION', '2h');
const RECONNECT_EVERY = envDuration('RECONNECT_EVERY', '60s');

const e2e = new Trend('chat_e2e_latency', true);
const sendErrors = new Rate('chat_send_errors');
const helloOk = new Rate('chat_handshake_ok');
const delivered = new Counter('chat_messages_delivered');
const apiOk = new Rate('chat_api_ok');

export const options = {
  setupTimeout: '300s',
  scenarios: {
    soak: {
      executor: 'constant-vus',
      vus: PAIRS * 2,
      duration: DURATION.text,
      gracefulStop: '15s',
    },
  },
  thresholds: {
    chat_e2e_latency: ['p(99)<250'],
    chat_send_errors: ['rate<0.01'],
    chat_handshake_ok: ['rate>0.999'],
    chat_api_ok: ['rate>0.999'],
    chat_messages_delivered: ['count>0'],
  },
};

export function setup() {
  return { users: registerUsers(PAIRS * 2) };
}

// One iteration is one connection's life: connect, chat until RECONNECT_EVERY, close.
export default function (data) {
  const { me, user, partner } = pairOf(data);
  const intervalMs = sendInterval(PAIRS, RATE);
  const node = me + __ITER;
  let next = 0;

  const profile = http.get(`${HTTP_URLS[node % HTTP_URLS.length]}/api/v1/users/me`, {
    headers: { authorization: `Bearer ${user.token}` },
    tags: { name: 'me' },
  });
  apiOk.add(profile.status === 200);

  const res = ws.connect(wsUrl(node, user.token), null, (socket) => {
    socket.on('message', (text) => {
      const frame = JSON.parse(text);
      if (frame.type === 'hello') {
        helloOk.add(true);
        socket.setInterval(() => socket.send(sendFrame(`${__VU}-${__ITER}-${next++}`, partner.id, 'soak')), intervalMs);
        socket.setTimeout(() => socket.close(), RECONNECT_EVERY.ms * (0.75 + Math.random() / 2));
      } else if (frame.type === 'ack') {
        sendErrors.add(false);
      } else if (frame.type === 'error') {
        sendErrors.add(true);
      } else if (frame.type === 'message') {
        e2e.add(Date.now() - frame.ts);
        delivered.add(1);
      }
    });
  });
  if (!check(res, { 'upgraded (101)': (r) => r && r.status === 101 })) helloOk.add(false);
}
