// connect: ramp to TARGET open connections over RAMP, hold them for HOLD, then close.
// Reports handshake time (k6's ws_connecting), hello success and connections that dropped
// while held. USERS registered users are shared round-robin by the connections (several
// devices per user), because registering tens of thousands through argon2id would dominate.
//
//   k6 run -e HTTP_URLS=http://127.0.0.1:8080 -e TARGET=2000 -e RAMP=30s -e HOLD=60s loadtest/k6/connect.js
import exec from 'k6/execution';
import ws from 'k6/ws';
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import { envDuration, envInt, registerUsers, wsUrl } from './lib/common.js';

const TARGET = envInt('TARGET', 200);
const USERS = Math.min(TARGET, envInt('USERS', 200));
const RAMP = envDuration('RAMP', '20s');
const HOLD = envDuration('HOLD', '30s');

const helloOk = new Rate('chat_handshake_ok');
const helloTime = new Trend('chat_hello_time', true);
const dropped = new Counter('chat_connections_dropped');

export const options = {
  setupTimeout: '600s',
  scenarios: {
    connect: {
      executor: 'ramping-vus',
      startVUs: 0,
      stages: [
        { duration: RAMP.text, target: TARGET },
        { duration: HOLD.text, target: TARGET },
      ],
      gracefulRampDown: '5s',
      gracefulStop: '10s',
    },
  },
  thresholds: {
    chat_handshake_ok: ['rate>0.99'],
    ws_connecting: ['p(95)<1000'],
    chat_connections_dropped: ['count==0'],
  },
};

export function setup() {
  return { users: registerUsers(USERS) };
}

export default function (data) {
  const user = data.users[(__VU - 1) % data.users.length];
  // Stay connected until the end of the hold, whenever this VU started.
  const holdMs = Math.max(1000, RAMP.ms + HOLD.ms - (Date.now() - exec.scenario.startTime));
  const started = Date.now();
  let closingByUs = false;
  const res = ws.connect(wsUrl(__VU - 1, user.token), null, (socket) => {
    socket.on('message', (text) => {
      if (JSON.parse(text).type === 'hello') {
        helloOk.add(true);
        helloTime.add(Date.now() - started);
      }
    });
    socket.on('close', () => {
      if (!closingByUs) dropped.add(1);
    });
    socket.setTimeout(() => {
      closingByUs = true;
      socket.close();
    }, holdMs);
  });
  if (!check(res, { 'upgraded (101)': (r) => r && r.status === 101 })) helloOk.add(false);
}
