// Shared by every k6 script: target URLs from the environment, user registration (and rooms)
// through our HTTP API in setup(), and the frames of our protocol (docs/protocol.md).
import http from 'k6/http';
import { check, fail } from 'k6';

// HTTP_URLS: comma-separated gateway base URLs, e.g. "http://127.0.0.1:8080,http://127.0.0.1:8081".
// WS_URLS defaults to the same hosts with ws:// (or wss:// for https://).
export const HTTP_URLS = (__ENV.HTTP_URLS || 'http://127.0.0.1:8080,http://127.0.0.1:8081')
  .split(',').map((u) => u.trim().replace(/\/$/, '')).filter((u) => u.length > 0);
export const WS_URLS = (__ENV.WS_URLS ? __ENV.WS_URLS.split(',') : HTTP_URLS.map((u) => u.replace(/^http/, 'ws')))
  .map((u) => u.trim().replace(/\/$/, ''));

export function envInt(name, fallback) {
  const v = __ENV[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) fail(`${name} must be a non-negative number, got ${v}`);
  return n;
}

export function envDuration(name, fallback) {
  const v = __ENV[name] || fallback;
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(v);
  if (!m) fail(`${name} must look like 30s, 5m or 2h, got ${v}`);
  const unit = { ms: 1, s: 1000, m: 60000, h: 3600000 }[m[2]];
  return { text: v, ms: Number(m[1]) * unit };
}

// Registers `count` users, spread over the nodes, in parallel batches; returns [{id, token}].
// Emails carry a per-run tag so runs never collide. Registration hashes with argon2id, so this
// takes a while for thousands of users; connect.js reuses a smaller pool of users.
export function registerUsers(count) {
  const run = `${Date.now().toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
  const users = [];
  const batch = 20;
  for (let start = 0; start < count; start += batch) {
    const requests = [];
    for (let i = start; i < Math.min(count, start + batch); i++) {
      requests.push({
        method: 'POST',
        url: `${HTTP_URLS[i % HTTP_URLS.length]}/api/v1/auth/register`,
        body: JSON.stringify({ name: `k6 user ${i}`, email: `k6-${run}-${i}@load.test`, password: `pw-${run}-${i}-secret` }),
        params: { headers: { 'content-type': 'application/json' }, tags: { name: 'register' } },
      });
    }
    for (const res of http.batch(requests)) {
      if (!check(res, { 'register 201': (r) => r.status === 201 })) {
        fail(`registration failed: ${res.status} ${res.body}`);
      }
      const body = res.json();
      users.push({ id: body.user.id, token: body.token });
    }
  }
  return users;
}

// The WebSocket URL for `user` on node `i`. Browsers cannot set headers, so the token travels
// in the query, as the protocol allows.
export function wsUrl(i, token) {
  return `${WS_URLS[i % WS_URLS.length]}/ws?access_token=${encodeURIComponent(token)}`;
}

export function sendFrame(id, to, body) {
  return JSON.stringify({ type: 'send', id, to, body });
}

// A `send` to a room (or any conversation the sender is a member of).
export function roomSendFrame(id, conversationId, body) {
  return JSON.stringify({ type: 'send', id, conversation_id: conversationId, body });
}

// The API names at most this many user ids per room request.
const ROOM_IDS_PER_REQUEST = 1000;

// Creates a room owned by `owner` ({id, token}) with the users `memberIds` (the server adds the
// owner itself): the first 1,000 ids in POST /api/v1/rooms, the rest 1,000 per request through
// POST /api/v1/rooms/{id}/members. Returns the room's id; fails the test on any error.
export function createRoom(owner, name, memberIds) {
  const base = HTTP_URLS[0];
  const headers = { 'content-type': 'application/json', authorization: `Bearer ${owner.token}` };
  let res = http.post(`${base}/api/v1/rooms`,
    JSON.stringify({ name, member_ids: memberIds.slice(0, ROOM_IDS_PER_REQUEST) }),
    { headers, tags: { name: 'create_room' } });
  if (!check(res, { 'room 201': (r) => r.status === 201 })) fail(`room creation failed: ${res.status} ${res.body}`);
  const id = res.json().id;
  for (let start = ROOM_IDS_PER_REQUEST; start < memberIds.length; start += ROOM_IDS_PER_REQUEST) {
    res = http.post(`${base}/api/v1/rooms/${id}/members`,
      JSON.stringify({ user_ids: memberIds.slice(start, start + ROOM_IDS_PER_REQUEST) }),
      { headers, tags: { name: 'add_room_members' } });
    if (!check(res, { 'members 200': (r) => r.status === 200 })) fail(`adding room members failed: ${res.status} ${res.body}`);
  }
  const count = res.json().member_count;
  if (count !== memberIds.length + 1) fail(`room ${id} has ${count} members, wanted ${memberIds.length + 1}`);
  return id;
}

// This VU's user and its partner: VUs pair off (1 with 2, 3 with 4, ...), as setup() registered
// them; `me` is the VU's index into data.users.
export function pairOf(data) {
  const me = __VU - 1;
  return { me, user: data.users[me], partner: data.users[me ^ 1] };
}

// Milliseconds between one connection's sends for `rate` messages/s over `pairs` pairs.
export function sendInterval(pairs, rate) {
  return Math.max(1, (1000 * pairs * 2) / Math.max(rate, 1));
}
