// rooms: room fan-out at several room sizes. setup() registers max(ROOM_SIZES) users and creates
// one room per size, owned by the first user. The sizes then run one after the other: every
// member of the room connects (member i to node i mod the number of nodes), and once all are
// connected the owner sends RATE messages per second to the room for DURATION. Each member's
// arrival is timed from the message's `ts` (set by the accepting node) as a Trend tagged with the
// room size; because one VU holds the whole room, it also times each message until its last
// member has it, and counts the deliveries that never arrived.
//
// One VU holds all of a room's connections (k6/experimental/websockets, one event loop), so the
// VU's JavaScript thread reads every delivery, and at high RATE x room size part of the latency
// it times is its own queue: lower RATE for large rooms (loadtest/README.md has numbers).
//
//   k6 run -e HTTP_URLS=http://127.0.0.1:8080,http://127.0.0.1:8081 -e ROOM_SIZES=10,100,500 \
//          -e RATE=10 -e DURATION=30s loadtest/k6/rooms.js
import exec from 'k6/execution';
import { fail } from 'k6';
import { WebSocket } from 'k6/experimental/websockets';
import { Counter, Rate, Trend } from 'k6/metrics';
import { clearInterval, clearTimeout, setInterval, setTimeout } from 'k6/timers';
import { createRoom, envDuration, envInt, registerUsers, roomSendFrame, wsUrl } from './lib/common.js';

const ROOM_SIZES = (__ENV.ROOM_SIZES || '10,50,100').split(',').map((s) => s.trim()).filter((s) => s !== '').map(Number);
for (const size of ROOM_SIZES) {
  if (!Number.isInteger(size) || size < 2) fail(`ROOM_SIZES must list integers of at least 2, got ${__ENV.ROOM_SIZES}`);
}
if (ROOM_SIZES.length === 0) fail('ROOM_SIZES is empty');
const MAX_SIZE = Math.max(...ROOM_SIZES);
const RATE = envInt('RATE', 20);
const DURATION = envDuration('DURATION', '30s');
const BODY_BYTES = envInt('BODY_BYTES', 64);
const P95_MS = envInt('P95_MS', 100);
const P99_MS = envInt('P99_MS', 200);
const LAST_P99_MS = envInt('LAST_P99_MS', 2 * P99_MS);
// After DURATION, wait this long for messages still in flight before counting missing ones.
const DRAIN_MS = envInt('DRAIN_MS', 3000);
// Connections opened per second while a room connects, and how long all of them may take.
const CONNECT_RATE = Math.max(1, envInt('CONNECT_RATE', 500));
const CONNECT_TIMEOUT = envDuration('CONNECT_TIMEOUT', '60s');

const fanout = new Trend('rooms_fanout_latency', true);
const lastMember = new Trend('rooms_last_member_latency', true);
const ackLatency = new Trend('rooms_ack_latency', true);
const connectTime = new Trend('rooms_connect_time', true);
const sent = new Counter('rooms_messages_sent');
const acked = new Counter('rooms_messages_acked');
const delivered = new Counter('rooms_messages_delivered');
const missing = new Counter('rooms_missing_deliveries');
const outOfOrder = new Counter('rooms_out_of_order');
const dropped = new Counter('rooms_connections_dropped');
const sendErrors = new Rate('rooms_send_errors');
const helloOk = new Rate('rooms_handshake_ok');

const thresholds = {
  rooms_fanout_latency: [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
  rooms_last_member_latency: [`p(99)<${LAST_P99_MS}`],
  rooms_send_errors: ['rate<0.01'],
  rooms_handshake_ok: ['rate==1'],
  rooms_missing_deliveries: ['count==0'],
  rooms_out_of_order: ['count==0'],
  rooms_connections_dropped: ['count==0'],
  rooms_messages_delivered: ['count>0'],
};
// The same per room size; thresholds on the tagged sub-metrics also make k6 print them.
for (const size of ROOM_SIZES) {
  thresholds[`rooms_fanout_latency{room_size:${size}}`] = [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`];
  thresholds[`rooms_last_member_latency{room_size:${size}}`] = [`p(99)<${LAST_P99_MS}`];
  thresholds[`rooms_messages_delivered{room_size:${size}}`] = ['count>0'];
  thresholds[`rooms_missing_deliveries{room_size:${size}}`] = ['count==0'];
}

// Each room gets CONNECT_TIMEOUT to connect, DURATION to send, DRAIN_MS to drain, plus slack.
const slotSeconds = Math.ceil((CONNECT_TIMEOUT.ms + DURATION.ms + DRAIN_MS) / 1000) + 15;

export const options = {
  // Registration costs ~30 ms of gateway CPU per user (argon2id) in a release build.
  setupTimeout: `${300 + MAX_SIZE}s`,
  scenarios: {
    rooms: {
      executor: 'per-vu-iterations',
      vus: 1,
      iterations: ROOM_SIZES.length,
      maxDuration: `${slotSeconds * ROOM_SIZES.length}s`,
    },
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(95)', 'p(99)', 'max', 'count'],
  thresholds,
};

export function setup() {
  const users = registerUsers(MAX_SIZE);
  const owner = users[0];
  const run = Date.now().toString(36);
  const rooms = ROOM_SIZES.map((size, k) => ({
    size,
    id: createRoom(owner, `k6 rooms ${run} #${k} (${size})`, users.slice(1, size).map((u) => u.id)),
  }));
  return { users, rooms };
}

// Latencies are whole milliseconds: a histogram of counts per millisecond gives exact
// percentiles for the per-room log line without keeping every sample.
function histogram() {
  return { counts: [], n: 0 };
}
function record(h, ms) {
  const i = Math.max(0, Math.round(ms));
  h.counts[i] = (h.counts[i] || 0) + 1;
  h.n++;
}
function percentile(h, p) {
  if (h.n === 0) return NaN;
  const rank = Math.ceil((p / 100) * h.n);
  let seen = 0;
  for (let i = 0; i < h.counts.length; i++) {
    seen += h.counts[i] || 0;
    if (seen >= rank) return i;
  }
  return h.counts.length - 1;
}
function summary(h) {
  return `p50=${percentile(h, 50)} p95=${percentile(h, 95)} p99=${percentile(h, 99)} max=${percentile(h, 100)} ms`;
}

// One iteration is one room size: connect every member, send, drain, close.
export default function (data) {
  const room = data.rooms[exec.scenario.iterationInTest];
  const size = room.size;
  const tags = { room_size: String(size) };
  // Tags k6's own metrics (ws_connecting, ws_msgs_received, ...) with the room size too.
  exec.vu.metrics.tags.room_size = String(size);

  const padding = 'x'.repeat(Math.max(1, BODY_BYTES));
  const conns = [];
  const pending = new Map(); // send id -> time sent
  const ackedSeqs = [];
  const perSeq = new Map(); // seq -> deliveries so far
  const fanoutHist = histogram();
  const lastHist = histogram();
  const totals = { sent: 0, acked: 0, errors: 0, delivered: 0, missing: 0, complete: 0 };
  const started = Date.now();
  let phase = 'connecting';
  let settled = 0; // connections that either said hello or failed
  let receivers = 0; // members, other than the sender, connected when sending started
  let sendTimer = null;

  const connectTimer = setTimeout(() => {
    for (const c of conns) if (!c.hello && !c.failed) failConn(c);
    for (let i = conns.length; i < size; i++) helloOk.add(false, tags);
    startSending();
  }, CONNECT_TIMEOUT.ms);

  function failConn(c) {
    if (c.failed || c.hello) return;
    c.failed = true;
    settled++;
    helloOk.add(false, tags);
    if (settled === size) startSending();
  }

  function onFrame(c, text) {
    const now = Date.now();
    const frame = JSON.parse(text);
    switch (frame.type) {
      case 'hello':
        if (c.failed) { // after CONNECT_TIMEOUT: counted as failed already
          c.closing = true;
          c.ws.close();
          break;
        }
        c.hello = true;
        settled++;
        helloOk.add(true, tags);
        if (settled === size) startSending();
        break;
      case 'ack': {
        const t = pending.get(frame.id);
        if (t !== undefined) {
          ackLatency.add(now - t, tags);
          pending.delete(frame.id);
        }
        acked.add(1, tags);
        sendErrors.add(false, tags);
        totals.acked++;
        ackedSeqs.push(frame.seq);
        break;
      }
      case 'error':
        if (frame.id) pending.delete(frame.id);
        sendErrors.add(true, tags);
        totals.errors++;
        console.warn(`room ${size}: error frame ${text}`);
        break;
      case 'message': {
        if (frame.conversation_id !== room.id) break;
        const latency = now - frame.ts;
        fanout.add(latency, tags);
        delivered.add(1, tags);
        record(fanoutHist, latency);
        totals.delivered++;
        if (frame.seq <= c.lastSeq) outOfOrder.add(1, tags);
        c.lastSeq = Math.max(c.lastSeq, frame.seq);
        const n = (perSeq.get(frame.seq) || 0) + 1;
        perSeq.set(frame.seq, n);
        // The last member to get it: the time until the whole room has the message.
        if (n === receivers) {
          lastMember.add(latency, tags);
          record(lastHist, latency);
          totals.complete++;
        }
        break;
      }
      default: // membership, read, typing: not ours to time
    }
  }

  function open(i) {
    if (phase !== 'connecting') return;
    const c = { i, hello: false, failed: false, closing: false, lastSeq: 0, ws: null };
    conns.push(c);
    const socket = new WebSocket(wsUrl(i, data.users[i].token));
    c.ws = socket;
    socket.onmessage = (e) => onFrame(c, e.data);
    socket.onerror = (e) => {
      if (!c.hello) failConn(c);
      else if (!c.closing) console.warn(`room ${size}: member ${i}: ${e.error}`);
    };
    socket.onclose = () => {
      if (!c.hello) failConn(c);
      else if (!c.closing) dropped.add(1, tags);
    };
  }

  function startSending() {
    if (phase !== 'connecting') return;
    phase = 'sending';
    clearTimeout(connectTimer);
    const sender = conns[0];
    receivers = conns.filter((c) => c.hello && c.i !== 0).length;
    connectTime.add(Date.now() - started, tags);
    if (!sender || !sender.hello) {
      console.error(`room ${size}: the sender did not connect; nothing sent`);
      finish();
      return;
    }
    // Open loop: every tick sends what is due since the start, so a slow tick does not lower the rate.
    const t0 = Date.now();
    const tick = Math.max(10, 1000 / Math.max(RATE, 1));
    sendTimer = setInterval(() => {
      const due = Math.floor(((Date.now() - t0) * RATE) / 1000);
      while (totals.sent < due) {
        const id = `r${size}-${totals.sent}`;
        pending.set(id, Date.now());
        sender.ws.send(roomSendFrame(id, room.id, padding));
        sent.add(1, tags);
        totals.sent++;
      }
    }, tick);
    setTimeout(() => {
      clearInterval(sendTimer);
      phase = 'draining';
      setTimeout(finish, DRAIN_MS);
    }, DURATION.ms);
  }

  function finish() {
    phase = 'closing';
    for (const seq of ackedSeqs) {
      const m = receivers - (perSeq.get(seq) || 0);
      if (m > 0) {
        missing.add(m, tags);
        totals.missing += m;
      }
    }
    // Sends never answered count as errors.
    for (let k = 0; k < pending.size; k++) sendErrors.add(true, tags);
    totals.errors += pending.size;
    for (const c of conns) {
      c.closing = true;
      if (c.hello) c.ws.close();
    }
    console.log(`room ${size}: ${receivers + (conns[0] && conns[0].hello ? 1 : 0)}/${size} connected; ` +
      `sent ${totals.sent}, acked ${totals.acked}, errors ${totals.errors}; ` +
      `delivered ${totals.delivered} of ${totals.acked * receivers}, missing ${totals.missing}; ` +
      `fan-out ${summary(fanoutHist)}; last member (${totals.complete} messages) ${summary(lastHist)}`);
  }

  // Spread the handshakes at CONNECT_RATE per second, round-robin over the nodes.
  for (let i = 0; i < size; i++) {
    const at = (i * 1000) / CONNECT_RATE;
    if (at === 0) open(i);
    else setTimeout(() => open(i), at);
  }
}
