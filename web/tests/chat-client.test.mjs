// Unit tests of web/chat-client.js against a scripted WebSocket: the delivery bookkeeping and
// the close-code handling of docs/protocol.md, cases a real server rarely produces on demand.

import { afterEach, beforeEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ChatClient } from '../chat-client.js';

const CONV = '0190f3c1-0000-7000-8000-000000000001';
const OTHER = '0190f3c1-0000-7000-8000-000000000002';
const ME = '0190f3a2-0000-7000-8000-00000000000a';
const PEER = '0190f3a5-0000-7000-8000-00000000000b';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Plays the server's side of one connection. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = null;
    FakeSocket.all.push(this);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close(code) {
    this.closed = code;
    setTimeout(() => this.onclose?.({ code }), 0);
  }
  recv(frame) {
    this.onmessage({ data: JSON.stringify(frame) });
  }
  hello() {
    this.recv({ type: 'hello', user_id: ME, conn_id: 'c', node_id: 'n1', heartbeat_ms: 15000 });
  }
  drop(code) {
    this.onclose({ code });
  }
  frames(type) {
    return this.sent.filter((f) => f.type === type);
  }
}

function msg(seq, conversationId = CONV, from = PEER) {
  return { type: 'message', msg_id: `m${seq}`, conversation_id: conversationId, seq, from, body: `b${seq}`, ts: 1 };
}

let clients = [];
function newClient(options = {}) {
  const client = new ChatClient({ base: 'http://127.0.0.1:9', token: 'x.e30.y', WebSocketImpl: FakeSocket, random: () => 0.5, ticket: async () => 'tkt', ...options });
  const events = { message: [], state: [], unauthorized: [], 'server-error': [], conversation: [] };
  for (const type of Object.keys(events)) client.addEventListener(type, (e) => events[type].push(e.detail));
  clients.push(client);
  return { client, events };
}
const lastSocket = () => FakeSocket.all[FakeSocket.all.length - 1];
/** Connects and lets the ticket arrive, so the socket exists. */
async function connected(client) {
  client.connect();
  await sleep(0);
}
const seqs = (events) => events.message.map((d) => d.message.seq);

beforeEach(() => {
  FakeSocket.all = [];
});
afterEach(() => {
  for (const c of clients) c.close();
  clients = [];
});

describe('delivery bookkeeping', () => {
  test('after hello, one sync names every held conversation with its last_seq, and watches are sent again', async () => {
    const { client } = newClient();
    client.track(CONV, 7);
    client.track(OTHER, 0);
    client.watch([PEER]);
    await connected(client);
    const ws = lastSocket();
    assert.match(ws.url, /^ws:\/\/127\.0\.0\.1:9\/ws\?ticket=tkt$/, 'a ticket, never the token, in the URL');
    assert.equal(ws.sent.length, 0, 'nothing is sent before hello');
    ws.hello();
    assert.equal(client.state, 'online');
    assert.deepEqual(ws.frames('sync'), [{ type: 'sync', conversations: [{ conversation_id: CONV, after_seq: 7 }, { conversation_id: OTHER, after_seq: 0 }] }]);
    assert.deepEqual(ws.frames('presence.watch'), [{ type: 'presence.watch', user_ids: [PEER] }]);
  });

  test('a message is taken once per (conversation_id, seq), whatever the order it comes in', async () => {
    const { client, events } = newClient();
    client.track(CONV, 2);
    await connected(client);
    const ws = lastSocket();
    ws.hello();
    ws.recv({ type: 'synced', conversation_id: CONV, last_seq: 2, complete: true });
    for (const seq of [2, 3, 3, 1, 4, 4]) ws.recv(msg(seq));
    assert.deepEqual(seqs(events), [3, 4]);
    assert.equal(client.lastSeq(CONV), 4);
  });

  test('a gap is held and synced from last_seq; the sync fills it without duplicates', async () => {
    const { client, events } = newClient();
    client.track(CONV, 1);
    await connected(client);
    const ws = lastSocket();
    ws.hello();
    ws.recv({ type: 'synced', conversation_id: CONV, last_seq: 1, complete: true });
    ws.recv(msg(4));
    assert.equal(client.lastSeq(CONV), 1, 'last_seq stays below the gap');
    await sleep(400);
    assert.deepEqual(ws.frames('sync').at(-1), { type: 'sync', conversations: [{ conversation_id: CONV, after_seq: 1 }] });
    ws.recv(msg(2));
    ws.recv(msg(3));
    ws.recv({ type: 'synced', conversation_id: CONV, last_seq: 4, complete: true });
    assert.deepEqual(seqs(events), [4, 2, 3]);
    assert.equal(client.lastSeq(CONV), 4);
  });

  test('a gap closed by a frame still queued needs no sync (an ack can overtake a message)', async () => {
    const { client, events } = newClient();
    client.track(CONV, 0);
    await connected(client);
    const ws = lastSocket();
    ws.hello();
    ws.recv({ type: 'synced', conversation_id: CONV, last_seq: 0, complete: true });
    const sent = client.send({ conversationId: CONV, body: 'mine' });
    const { id } = ws.frames('send')[0];
    ws.recv({ type: 'ack', id, msg_id: 'm2', conversation_id: CONV, seq: 2, ts: 5 });
    assert.equal((await sent).seq, 2);
    ws.recv(msg(1));
    await sleep(400);
    assert.equal(ws.frames('sync').length, 1, 'only the sync after hello');
    assert.deepEqual(seqs(events), [2, 1]);
    assert.equal(events.message[0].own, true);
    assert.equal(client.lastSeq(CONV), 2);
  });

  test('synced with complete false asks again from its last_seq', async () => {
    const { client } = newClient();
    client.track(CONV, 0);
    await connected(client);
    const ws = lastSocket();
    ws.hello();
    ws.recv({ type: 'synced', conversation_id: CONV, last_seq: 500, complete: false });
    assert.deepEqual(ws.frames('sync').at(-1), { type: 'sync', conversations: [{ conversation_id: CONV, after_seq: 500 }] });
  });

  test('a conversation seen for the first time is announced and held from that message on', async () => {
    const { client, events } = newClient();
    await connected(client);
    lastSocket().hello();
    lastSocket().recv(msg(12, OTHER));
    assert.deepEqual(events.conversation.map((d) => d.conversationId), [OTHER]);
    assert.equal(client.lastSeq(OTHER), 12);
  });

  test('tracking a held conversation again never moves its last_seq (a list can trail live traffic)', () => {
    const { client } = newClient();
    client.track(CONV, 3);
    client.track(CONV, 9);
    assert.equal(client.lastSeq(CONV), 3);
  });

  test('a sync refused with forbidden stops tracking that conversation', async () => {
    const { client, events } = newClient();
    client.track(CONV, 0);
    client.track(OTHER, 0);
    await connected(client);
    const ws = lastSocket();
    ws.hello();
    ws.recv({ type: 'error', code: 'forbidden', message: 'not a member' });
    ws.recv({ type: 'synced', conversation_id: OTHER, last_seq: 0, complete: true });
    assert.equal(client.isTracked(CONV), false);
    assert.equal(client.isTracked(OTHER), true);
    assert.equal(events['server-error'][0].conversation_id, CONV);
  });

  test('added to a room: it is synced from the start', async () => {
    const { client } = newClient();
    await connected(client);
    const ws = lastSocket();
    ws.hello();
    ws.recv({ type: 'membership', conversation_id: CONV, user_id: ME, change: 'added', by: PEER });
    assert.deepEqual(ws.frames('sync').at(-1), { type: 'sync', conversations: [{ conversation_id: CONV, after_seq: 0 }] });
  });
});

describe('connection', () => {
  test('a send is refused while offline; one in flight when the connection drops is sent again, same id, after hello', async () => {
    const { client } = newClient();
    await assert.rejects(client.send({ to: PEER, body: 'x' }), { code: 'offline' });
    await connected(client);
    lastSocket().hello();
    const pending = client.send({ to: PEER, body: 'x' });
    const [first] = lastSocket().frames('send');
    lastSocket().drop(1006);
    client.reconnectNow();
    await sleep(0);
    const ws = lastSocket();
    ws.hello();
    assert.deepEqual(ws.frames('send'), [first], 'the same frame, with the same id');
    ws.recv({ type: 'ack', id: first.id, msg_id: 'm1', conversation_id: CONV, seq: 1, ts: 1 });
    assert.equal((await pending).msg_id, 'm1');
  });

  test('unavailable on a send is retried with the same id', async () => {
    const { client } = newClient();
    await connected(client);
    const ws = lastSocket();
    ws.hello();
    const pending = client.send({ conversationId: CONV, body: 'x' });
    const [first] = ws.frames('send');
    ws.recv({ type: 'error', id: first.id, code: 'unavailable', message: 'try later' });
    await sleep(1100);
    assert.deepEqual(ws.frames('send'), [first, first]);
    ws.recv({ type: 'ack', id: first.id, msg_id: 'm1', conversation_id: CONV, seq: 1, ts: 1 });
    assert.equal((await pending).seq, 1);
  });

  test('other errors on a send fail it, in words the page can show', async () => {
    const { client } = newClient();
    await connected(client);
    lastSocket().hello();
    const pending = client.send({ to: PEER, body: 'x' });
    lastSocket().recv({ type: 'error', id: lastSocket().frames('send')[0].id, code: 'not_found', message: 'no such recipient' });
    await assert.rejects(pending, { code: 'not_found' });
  });

  test('resync: every held conversation is synced again on the same connection', async () => {
    const { client } = newClient();
    client.track(CONV, 4);
    await connected(client);
    const ws = lastSocket();
    ws.hello();
    ws.recv({ type: 'synced', conversation_id: CONV, last_seq: 6, complete: true });
    ws.recv({ type: 'resync', reason: 'pubsub_reconnected' });
    assert.deepEqual(ws.frames('sync').at(-1), { type: 'sync', conversations: [{ conversation_id: CONV, after_seq: 6 }] });
    assert.equal(FakeSocket.all.length, 1);
  });

  test('reconnects with exponential backoff and jitter, capped at 30 s', async () => {
    const { client, events } = newClient({ random: () => 0.99 });
    await connected(client);
    lastSocket().hello();
    lastSocket().drop(4000);
    const delays = () => events.state.filter((s) => s.state === 'reconnecting' && s.retryInMs).map((s) => s.retryInMs);
    assert.equal(delays()[0], Math.round(500 * 1.49));
    // Let the attempts run against sockets that fail at once, as a stopped node does.
    for (let i = 0; i < 8; i += 1) {
      client.reconnectNow();
      await sleep(0);
      lastSocket().hello(); // (so the check for a refused token is skipped)
      lastSocket().drop(1011);
    }
    const seen = delays();
    for (let i = 1; i < seen.length; i += 1) assert.ok(seen[i] >= seen[i - 1], `delays grow: ${seen}`);
    assert.equal(seen.at(-1), Math.round(30000 * 1.49));
  });

  test('1001 (node draining) reconnects after a short delay', async () => {
    const { client, events } = newClient();
    await connected(client);
    lastSocket().hello();
    client.attempt = 6;
    lastSocket().drop(1001);
    assert.equal(events.state.at(-1).retryInMs, 500);
  });

  test('4100 asks for a new login and does not reconnect', async () => {
    const { client, events } = newClient();
    await connected(client);
    lastSocket().hello();
    lastSocket().drop(4100);
    await sleep(10);
    assert.deepEqual(events.unauthorized, [{ reason: 'token_expired' }]);
    assert.equal(client.state, 'expired');
    assert.equal(FakeSocket.all.length, 1);
  });

  test('4101 (password reset: token revoked) asks for a new login and does not reconnect', async () => {
    const { client, events } = newClient();
    await connected(client);
    lastSocket().hello();
    lastSocket().drop(4101);
    await sleep(10);
    assert.deepEqual(events.unauthorized, [{ reason: 'token_revoked' }]);
    assert.equal(client.state, 'expired');
    assert.equal(FakeSocket.all.length, 1);
  });

  test('every connection asks for a fresh ticket; a ticket refused with 401 stops and asks for a login, one that cannot be fetched is retried', async () => {
    let asked = 0;
    const { client } = newClient({ ticket: async () => `t${++asked}` });
    await connected(client);
    assert.match(lastSocket().url, /\?ticket=t1$/);
    lastSocket().hello();
    lastSocket().drop(1006);
    client.reconnectNow();
    await sleep(0);
    assert.match(lastSocket().url, /\?ticket=t2$/, 'tickets are single use');

    const refused = newClient({
      ticket: async () => {
        const { ApiError } = await import('../chat-client.js');
        throw new ApiError(401, 'unauthorized', 'no');
      },
    });
    await connected(refused.client);
    await sleep(0);
    assert.deepEqual(refused.events.unauthorized, [{ reason: 'token_refused' }]);
    assert.equal(FakeSocket.all.length, 2, 'no socket without a ticket');

    const offline = newClient({
      ticket: async () => {
        throw new TypeError('fetch failed');
      },
    });
    await connected(offline.client);
    await sleep(0);
    assert.equal(offline.client.state, 'reconnecting');
    assert.deepEqual(offline.events.unauthorized, []);
  });

  test('a handshake that fails while the token is refused (401) stops and asks for a login', async () => {
    const realFetch = globalThis.fetch;
    globalThis.fetch = async () => new Response(JSON.stringify({ error: { code: 'unauthorized', message: 'no' } }), { status: 401 });
    try {
      const { client, events } = newClient();
      await connected(client);
      lastSocket().drop(1006);
      await sleep(10);
      assert.deepEqual(events.unauthorized, [{ reason: 'token_refused' }]);
      assert.equal(client.state, 'expired');
    } finally {
      globalThis.fetch = realFetch;
    }
  });

  test('an expired token is not even tried', async () => {
    const past = Buffer.from(JSON.stringify({ exp: 1 })).toString('base64url');
    const { client, events } = newClient({ token: `x.${past}.y` });
    await connected(client);
    assert.equal(FakeSocket.all.length, 0);
    assert.deepEqual(events.unauthorized, [{ reason: 'token_expired' }]);
  });
});
