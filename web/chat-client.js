// The protocol client of docs/protocol.md as a plain ES module: the HTTP API (`Api`) and one
// WebSocket session that reconnects by itself (`ChatClient`). It owns delivery bookkeeping
// (per-conversation last_seq, gap detection, sync after every connect, dedup by
// (conversation_id, seq)) and reports everything else as events; it draws nothing.

/** Reconnect delays: 0.5 s doubling to 30 s, each multiplied by a random factor in [0.5, 1.5). */
export const DEFAULT_BACKOFF = Object.freeze({ initialMs: 500, maxMs: 30000 });

/** A connection that stayed up this long resets the backoff; a flapping one keeps backing off. */
const STABLE_AFTER_MS = 10000;
/** How long an unanswered `send` waits for its `ack` or `error` on an open connection. */
const SEND_TIMEOUT_MS = 10000;
/** A send may be repeated with its id this long after its first attempt and still get its
 *  original ack (`gateway_send_dedup_window_secs` is 10 minutes; keep a margin). */
const SEND_RETRY_WINDOW_MS = 9 * 60 * 1000;
/** `unavailable` on a send is retried with the same id this many times, 1 s, 2 s, 4 s apart. */
const SEND_UNAVAILABLE_RETRIES = 3;
/** A gap may be a queued frame still on its way (protocol.md, "Delivery and ordering"). */
const GAP_GRACE_MS = 300;
/** Per frame: sync names at most 100 conversations; 200 ids keep a watch frame under 16 KiB. */
const SYNC_BATCH = 100;
const WATCH_BATCH = 200;
/** The gateway refuses to watch more than this many users per connection. */
export const MAX_WATCHED = 1000;

/** A unique id for a `send`: it makes a retry of the same message safe. */
function newSendId() {
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === 'function') return globalThis.crypto.randomUUID();
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes); // randomUUID needs a secure context; this does not
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** An HTTP or WebSocket failure: `code` from the protocol's error table, or `network`,
 *  `offline`, `connection_lost`, `timeout` for failures that never reached a reply. */
export class ApiError extends Error {
  constructor(status, code, message, fields = null) {
    super(message || code);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.fields = fields;
  }
}

/** The API base URL: `?api=` when given, else the page's own origin. */
export function apiBaseFrom(loc = globalThis.location) {
  const override = new URLSearchParams(loc.search).get('api');
  const url = new URL(override || loc.origin, loc.href);
  return (url.origin + url.pathname).replace(/\/+$/, '');
}

/** The token's `exp` in Unix ms, or null. The token stays opaque otherwise (protocol.md, Tokens). */
export function tokenExpiry(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === 'number' ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

/** The HTTP API, one method per endpoint. Every failure is an `ApiError`. */
export class Api {
  constructor(base, token = null) {
    this.base = base;
    this.token = token;
  }

  async request(method, path, { body, query } = {}) {
    const url = new URL(`${this.base}/api/v1${path}`);
    for (const [key, value] of Object.entries(query || {})) {
      if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, String(value));
    }
    const headers = { Accept: 'application/json' };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch {
      throw new ApiError(0, 'network', 'the server could not be reached');
    }
    if (res.status === 204) return null;
    let data = null;
    try {
      data = await res.json();
    } catch {
      data = null;
    }
    if (!res.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(res.status, err.code || `http_${res.status}`, err.message || res.statusText, err.fields || null);
    }
    return data;
  }

  register({ name, email, password }) {
    return this.request('POST', '/auth/register', { body: { name, email, password } });
  }
  login({ email, password }) {
    return this.request('POST', '/auth/login', { body: { email, password } });
  }
  me() {
    return this.request('GET', '/users/me');
  }
  /** `{ticket, expires_in}`: opens one WebSocket within about 30 s, so the token stays out of URLs. */
  wsTicket() {
    return this.request('POST', '/ws/ticket');
  }
  /** `{name?, avatar_url?}`: a field left out stays as it is; `avatar_url: null` removes it. */
  updateMe(changes) {
    return this.request('PATCH', '/users/me', { body: changes });
  }
  /** Always answers 202, whether or not the email has an account. */
  requestPasswordReset(email) {
    return this.request('POST', '/auth/password-reset/request', { body: { email } });
  }
  confirmPasswordReset(token, newPassword) {
    return this.request('POST', '/auth/password-reset/confirm', { body: { token, new_password: newPassword } });
  }
  /** The users list (the caller's contacts, or everyone: `visibility` says), or with `email`
   *  the one user with that address. */
  users({ q, email, online, cursor, limit } = {}) {
    return this.request('GET', '/users', { query: { q, email, online, cursor, limit } });
  }
  presence(userIds) {
    return this.request('GET', '/presence', { query: { user_ids: userIds.join(',') } });
  }
  conversations({ cursor, limit } = {}) {
    return this.request('GET', '/conversations', { query: { cursor, limit } });
  }
  messages(conversationId, { beforeSeq, afterSeq, limit } = {}) {
    return this.request('GET', `/conversations/${encodeURIComponent(conversationId)}/messages`, {
      query: { before_seq: beforeSeq, after_seq: afterSeq, limit },
    });
  }
  createRoom(name, memberIds) {
    return this.request('POST', '/rooms', { body: { name, member_ids: memberIds } });
  }
  room(roomId) {
    return this.request('GET', `/rooms/${encodeURIComponent(roomId)}`);
  }
  addMembers(roomId, userIds) {
    return this.request('POST', `/rooms/${encodeURIComponent(roomId)}/members`, { body: { user_ids: userIds } });
  }
  /** Removes a member; leaving yourself, `block` may be `['room']`, `['adder']` or both. */
  removeMember(roomId, userId, { block = [] } = {}) {
    return this.request('DELETE', `/rooms/${encodeURIComponent(roomId)}/members/${encodeURIComponent(userId)}`, {
      query: { block: block.length ? block.join(',') : undefined },
    });
  }
  /** The owner gives a member a role: `admin`, `member`, or `owner` (handing the room over). */
  setRole(roomId, userId, role) {
    return this.request('PUT', `/rooms/${encodeURIComponent(roomId)}/members/${encodeURIComponent(userId)}`, { body: { role } });
  }
  blocks() {
    return this.request('GET', '/blocks');
  }
  unblockRoom(roomId) {
    return this.request('DELETE', `/blocks/rooms/${encodeURIComponent(roomId)}`);
  }
  unblockUser(userId) {
    return this.request('DELETE', `/blocks/users/${encodeURIComponent(userId)}`);
  }
}

/**
 * One user's WebSocket session. Events (CustomEvent, payload in `detail`):
 * - `state`: `{state, attempt, retryInMs, nodeId}`; state is `connecting`, `online`,
 *   `reconnecting`, `expired` (4100, 4101 or a refused token: log in again), `stopped` (another
 *   41xx code) or `closed`.
 * - `message`: `{message, source, own}` once per (conversation_id, seq); source is `live`,
 *   `sync` or `ack` (own sends). Order by `seq`, not by arrival.
 * - `conversation`: `{conversationId, message}` for a message in a conversation not tracked yet.
 * - `hello`, `read`, `typing`, `presence`, `membership`, `synced`, `resync`, `rebased`: the
 *   server frames. `rebased` ({conversation_id, from_seq, to_seq}): those seqs will never hold a
 *   message (the server's log lost data); messages shown from that range were lost.
 * - `server-error`: an `error` frame that answers no `send` (sync, read, typing, watch).
 * - `unauthorized`: `{reason}`, the token is expired (`token_expired`, 4100), revoked by a
 *   password reset (`token_revoked`, 4101) or refused at connect (`token_refused`); the client
 *   has stopped.
 */
export class ChatClient extends EventTarget {
  constructor({ base, token, userId = null, backoff = DEFAULT_BACKOFF, WebSocketImpl = globalThis.WebSocket, random = Math.random, ticket = null }) {
    super();
    this.base = base;
    this.token = token;
    this.userId = userId;
    this.nodeId = null;
    this.state = 'idle';
    this.backoff = backoff;
    this.attempt = 0;
    this.WebSocketImpl = WebSocketImpl;
    this.random = random;
    this.api = new Api(base, token);
    // Where each connection's single-use ticket comes from (tests pass their own).
    this._ticket = ticket || (async () => (await this.api.wsTicket()).ticket);
    this._opening = false;
    this._ws = null;
    this._stopped = false;
    this._retryTimer = null;
    this._helloAt = 0;
    this._convs = new Map(); // conversation_id -> {lastSeq, held:Set, syncing, gapTimer}
    this._watched = new Set();
    this._pending = new Map(); // send id -> {resolve, reject, timer, frame, firstSentAt, retries}
    this._syncQueue = []; // conversations whose `synced` is awaited, in the order asked
    this._onBrowserOnline = () => {
      if (this.state === 'reconnecting') this.reconnectNow();
    };
  }

  // ---- connection ----

  /** Starts the session; it then reconnects by itself until `close()` or a 41xx close. */
  connect() {
    this._stopped = false;
    globalThis.addEventListener?.('online', this._onBrowserOnline);
    this._open();
  }

  /** Ends the session for good (log out). */
  close() {
    this._stopped = true;
    clearTimeout(this._retryTimer);
    globalThis.removeEventListener?.('online', this._onBrowserOnline);
    if (this._ws) this._ws.close(1000, 'normal');
    this._failPending('connection_lost', 'the connection was closed');
    this._setState('closed');
  }

  /** Skips the rest of a backoff delay ("Retry now"). */
  reconnectNow() {
    if (this._stopped || this._ws || this._opening) return;
    clearTimeout(this._retryTimer);
    this._open();
  }

  get connected() {
    return this.state === 'online';
  }

  _wsUrl(ticket) {
    const url = new URL(`${this.base}/ws`);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    // A single-use ticket, never the token: URLs end up in proxy and ingress logs.
    url.searchParams.set('ticket', ticket);
    return url.href;
  }

  async _open() {
    if (this._stopped || this._opening) return;
    const exp = tokenExpiry(this.token);
    if (exp !== null && exp <= Date.now()) {
      this._unauthorized('token_expired');
      return;
    }
    this._setState(this.attempt === 0 ? 'connecting' : 'reconnecting');
    this._opening = true;
    let ticket;
    try {
      ticket = await this._ticket();
    } catch (e) {
      this._opening = false;
      if (this._stopped) return;
      if (e instanceof ApiError && e.status === 401) {
        this._unauthorized('token_refused');
        return;
      }
      this._scheduleReconnect(1006);
      return;
    }
    this._opening = false;
    if (this._stopped || this._ws) return;
    let ws;
    try {
      ws = new this.WebSocketImpl(this._wsUrl(ticket));
    } catch {
      this._scheduleReconnect(1006);
      return;
    }
    this._ws = ws;
    let gotHello = false;
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame && frame.type === 'hello') gotHello = true;
      this._onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._onClose(ev.code, gotHello);
    };
  }

  async _onClose(code, gotHello) {
    // Unacked sends stay pending and are sent again, with their ids, after the next hello.
    for (const p of this._pending.values()) clearTimeout(p.timer);
    for (const c of this._convs.values()) c.syncing = false;
    this._syncQueue = [];
    this.nodeId = null;
    if (this._stopped) {
      this._setState('closed');
      return;
    }
    if (gotHello && Date.now() - this._helloAt >= STABLE_AFTER_MS) this.attempt = 0;
    if (code === 4100) {
      this._unauthorized('token_expired');
      return;
    }
    if (code === 4101) {
      this._unauthorized('token_revoked'); // the password was reset: old tokens no longer work
      return;
    }
    if (code >= 4100 && code <= 4199) {
      this._stopped = true;
      this._setState('stopped');
      return;
    }
    if (!gotHello) {
      // A refused handshake (401) looks like any failed connection (1006) to a browser: ask
      // the HTTP API whether the token is still good before trying again.
      try {
        await this.api.me();
      } catch (e) {
        if (e instanceof ApiError && e.status === 401) {
          this._unauthorized('token_refused');
          return;
        }
      }
      if (this._stopped) return;
    }
    this._scheduleReconnect(code);
  }

  _scheduleReconnect(code) {
    // 1001: the node is draining; come back soon and let the load balancer pick another node.
    const step = code === 1001 ? 0 : this.attempt;
    const base = Math.min(this.backoff.maxMs, this.backoff.initialMs * 2 ** step);
    const delay = Math.round(base * (0.5 + this.random()));
    this.attempt += 1;
    this._setState('reconnecting', delay);
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  _unauthorized(reason) {
    this._stopped = true;
    clearTimeout(this._retryTimer);
    this._setState('expired');
    this._emit('unauthorized', { reason });
  }

  _setState(state, retryInMs = null) {
    this.state = state;
    this._emit('state', { state, attempt: this.attempt, retryInMs, nodeId: this.nodeId });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _sendFrame(frame) {
    if (!this._ws || this.state !== 'online') return false;
    this._ws.send(JSON.stringify(frame));
    return true;
  }

  // ---- frames from the server ----

  _onFrame(f) {
    switch (f.type) {
      case 'hello':
        this.userId = f.user_id;
        this.nodeId = f.node_id;
        this._helloAt = Date.now();
        this._setState('online');
        this._emit('hello', f);
        // Recovery step 3: one sync naming every conversation we hold, then our watches again.
        this._sync([...this._convs.keys()]);
        this._sendWatch('presence.watch', [...this._watched]);
        this._resendPending();
        break;
      case 'resync':
        // Step 7: live frames were lost on this connection; sync everything again on it.
        for (const c of this._convs.values()) c.syncing = false;
        this._sync([...this._convs.keys()]);
        this._emit('resync', f);
        break;
      case 'rebased':
        this._onRebased(f);
        break;
      case 'ack':
        this._onAck(f);
        break;
      case 'message':
        this._accept(f, 'live');
        break;
      case 'synced':
        this._onSynced(f);
        break;
      case 'error':
        this._onError(f);
        break;
      case 'membership':
        if (f.user_id === this.userId) {
          if (f.change === 'added') {
            this.track(f.conversation_id, 0);
            this._sync([f.conversation_id]);
          } else if (f.change === 'removed') {
            this.untrack(f.conversation_id);
          }
        }
        this._emit('membership', f);
        break;
      case 'read':
      case 'typing':
      case 'presence':
        this._emit(f.type, f);
        break;
      default:
        break; // protocol.md: ignore frame types we do not know
    }
  }

  _onAck(f) {
    const p = this._pending.get(f.id);
    if (!p) return;
    this._pending.delete(f.id);
    clearTimeout(p.timer);
    const message = {
      type: 'message',
      msg_id: f.msg_id,
      conversation_id: f.conversation_id,
      seq: f.seq,
      from: this.userId,
      body: p.frame.body,
      ts: f.ts,
    };
    if (p.frame.to) message.to = p.frame.to;
    this._accept(message, 'ack');
    p.resolve(f);
  }

  _onError(f) {
    const p = f.id !== undefined ? this._pending.get(f.id) : null;
    if (p) {
      clearTimeout(p.timer);
      // `unavailable` does not prove the message was not stored: retry with the same id.
      if (f.code === 'unavailable' && p.retries < SEND_UNAVAILABLE_RETRIES && this._inWindow(p)) {
        p.timer = setTimeout(() => this._transmit(f.id, p), 1000 * 2 ** p.retries);
        p.retries += 1;
        return;
      }
      this._pending.delete(f.id);
      p.reject(new ApiError(0, f.code, f.message));
      return;
    }
    // A sync answers each conversation, in the order asked, with its messages and `synced`, or
    // with an error frame without id: that error belongs to the oldest sync still waiting.
    const conversationId = this._syncQueue.shift();
    const c = conversationId && this._convs.get(conversationId);
    if (c) {
      c.syncing = false;
      if (f.code === 'forbidden') {
        this.untrack(conversationId); // not a member (any more): nothing to sync
      } else if (f.code === 'unavailable') {
        c.retries = (c.retries || 0) + 1;
        if (c.retries <= 5) setTimeout(() => this._sync([conversationId]), 1000 * c.retries);
      }
      this._emit('server-error', { ...f, conversation_id: conversationId, during: 'sync' });
      return;
    }
    this._emit('server-error', f);
  }

  _onSynced(f) {
    const c = this._convs.get(f.conversation_id);
    const queued = this._syncQueue.indexOf(f.conversation_id);
    if (queued >= 0) this._syncQueue.splice(queued, 1);
    if (!c) return;
    c.syncing = false;
    c.retries = 0;
    // Every message up to last_seq has now been sent on this connection.
    this._advance(c, f.last_seq);
    this._emit('synced', f);
    if (!f.complete) this._sync([f.conversation_id]);
    else if (c.held.size) this._scheduleGapSync(f.conversation_id, c);
  }

  /** The server's log skipped `from_seq..to_seq` (protocol.md, "When the log loses data"):
   *  count the range as held, so the gap it leaves is not waited for, and sync what follows. */
  _onRebased(f) {
    const c = this._convs.get(f.conversation_id);
    if (c) {
      // Held up to the range: it is held too. Otherwise the sync below skips it.
      if (c.lastSeq >= f.from_seq - 1) this._advance(c, f.to_seq);
      this._sync([f.conversation_id]);
    }
    this._emit('rebased', f);
  }

  // ---- delivery bookkeeping (protocol.md, "Recovering after a reconnect") ----

  /** Declares a conversation held from `lastSeq` on (0: from its start). A conversation held
   *  already keeps its own last_seq: a list that trails live traffic must not move it. */
  track(conversationId, lastSeq = 0) {
    if (this._convs.has(conversationId)) return false;
    this._convs.set(conversationId, { lastSeq, held: new Set(), syncing: false, gapTimer: null });
    return true;
  }

  untrack(conversationId) {
    const c = this._convs.get(conversationId);
    if (c) clearTimeout(c.gapTimer);
    this._convs.delete(conversationId);
  }

  isTracked(conversationId) {
    return this._convs.has(conversationId);
  }

  /** The highest seq held with every seq below it held too. */
  lastSeq(conversationId) {
    const c = this._convs.get(conversationId);
    return c ? c.lastSeq : 0;
  }

  /** Counts messages from a history page as held; returns those not seen before. */
  ingest(messages) {
    const fresh = [];
    for (const m of [...messages].sort((a, b) => a.seq - b.seq)) {
      if (!this._convs.has(m.conversation_id)) this.track(m.conversation_id, m.seq - 1);
      const c = this._convs.get(m.conversation_id);
      if (m.seq <= c.lastSeq || c.held.has(m.seq)) continue;
      this._hold(c, m.seq);
      fresh.push(m);
    }
    return fresh;
  }

  _accept(m, source) {
    let c = this._convs.get(m.conversation_id);
    if (!c) {
      // A conversation we did not know: hold it from this message on; older messages are
      // history (recovery step 4). The app is told so that it can list it.
      this.track(m.conversation_id, m.seq - 1);
      c = this._convs.get(m.conversation_id);
      this._emit('conversation', { conversationId: m.conversation_id, message: m });
    }
    if (m.seq <= c.lastSeq || c.held.has(m.seq)) return; // a duplicate
    this._hold(c, m.seq);
    if (c.held.size) this._scheduleGapSync(m.conversation_id, c);
    this._emit('message', { message: m, source, own: m.from === this.userId });
  }

  _hold(c, seq) {
    if (seq === c.lastSeq + 1) {
      c.lastSeq = seq;
      this._advance(c, seq);
    } else {
      c.held.add(seq);
    }
  }

  _advance(c, seq) {
    if (seq > c.lastSeq) c.lastSeq = seq;
    for (const s of c.held) if (s <= c.lastSeq) c.held.delete(s);
    while (c.held.has(c.lastSeq + 1)) {
      c.held.delete(c.lastSeq + 1);
      c.lastSeq += 1;
    }
  }

  _scheduleGapSync(conversationId, c) {
    if (c.gapTimer || c.syncing) return;
    c.gapTimer = setTimeout(() => {
      c.gapTimer = null;
      if (c.held.size && this._convs.get(conversationId) === c) this._sync([conversationId]);
    }, GAP_GRACE_MS);
  }

  _sync(conversationIds) {
    const wanted = conversationIds.filter((id) => {
      const c = this._convs.get(id);
      return c && !c.syncing;
    });
    if (this.state !== 'online') return;
    for (let i = 0; i < wanted.length; i += SYNC_BATCH) {
      const batch = wanted.slice(i, i + SYNC_BATCH);
      const conversations = batch.map((id) => ({ conversation_id: id, after_seq: this._convs.get(id).lastSeq }));
      if (this._sendFrame({ type: 'sync', conversations })) {
        for (const id of batch) this._convs.get(id).syncing = true;
        this._syncQueue.push(...batch);
      }
    }
  }

  // ---- frames to the server ----

  /** Sends a message: `{to, body}` (direct) or `{conversationId, body}`. Resolves with the ack.
   *  Refused while not connected; once sent, it is retried with its id until acked, across
   *  reconnects, for up to 9 minutes. */
  send({ to, conversationId, body }) {
    if (this.state !== 'online') {
      return Promise.reject(new ApiError(0, 'offline', 'not connected'));
    }
    const id = newSendId();
    const frame = { type: 'send', id, body };
    if (to) frame.to = to;
    else frame.conversation_id = conversationId;
    return new Promise((resolve, reject) => {
      const p = { resolve, reject, timer: null, frame, firstSentAt: Date.now(), retries: 0 };
      this._pending.set(id, p);
      this._transmit(id, p);
    });
  }

  _inWindow(p) {
    return Date.now() - p.firstSentAt < SEND_RETRY_WINDOW_MS;
  }

  /** Writes a pending send; without a connection it waits for the next hello. */
  _transmit(id, p) {
    clearTimeout(p.timer);
    p.timer = null;
    if (!this._sendFrame(p.frame)) return;
    p.timer = setTimeout(() => {
      this._pending.delete(id);
      p.reject(new ApiError(0, 'timeout', 'the server did not confirm in time'));
    }, SEND_TIMEOUT_MS);
  }

  _resendPending() {
    for (const [id, p] of this._pending) {
      if (this._inWindow(p)) {
        this._transmit(id, p);
      } else {
        this._pending.delete(id);
        p.reject(new ApiError(0, 'connection_lost', 'the connection dropped before the server confirmed'));
      }
    }
  }

  /** Marks a conversation read up to `seq`. */
  read(conversationId, seq) {
    if (seq >= 1) this._sendFrame({ type: 'read', conversation_id: conversationId, seq });
  }

  typing(conversationId) {
    this._sendFrame({ type: 'typing', conversation_id: conversationId });
  }

  /** Watches users' presence on this and every later connection. */
  watch(userIds) {
    const fresh = userIds.filter((id) => !this._watched.has(id) && id !== this.userId);
    const room = MAX_WATCHED - this._watched.size;
    const added = fresh.slice(0, Math.max(0, room));
    for (const id of added) this._watched.add(id);
    this._sendWatch('presence.watch', added);
  }

  unwatch(userIds) {
    const gone = userIds.filter((id) => this._watched.delete(id));
    this._sendWatch('presence.unwatch', gone);
  }

  _sendWatch(type, ids) {
    for (let i = 0; i < ids.length; i += WATCH_BATCH) {
      this._sendFrame({ type, user_ids: ids.slice(i, i + WATCH_BATCH) });
    }
  }

  _failPending(code, message) {
    for (const [id, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new ApiError(0, code, message));
      this._pending.delete(id);
    }
  }
}
