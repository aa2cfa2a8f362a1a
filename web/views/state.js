// The state every view reads and changes: who is logged in, the people and conversations known,
// the messages held and the open conversation; and the small lookups over it that several views
// share (names, titles, unread counts).

import { apiBaseFrom } from '../chat-client.js';

/** Messages and conversations fetched per page. */
export const PAGE_SIZE = 50;

/** Where the API is: this page's origin, or `?api=`. */
export const base = apiBaseFrom();

export const S = {
  api: null,
  client: null,
  me: null,
  users: new Map(), // id -> {id, name, online, last_seen}
  peopleOrder: [], // ids shown in the People list
  usersCursor: null,
  // `contacts` or `everyone`, as the users list last said; what the People search is (`name`, `email` or empty).
  visibility: null,
  peopleSearch: '',
  convs: new Map(), // id -> conversation (see newConv)
  gone: new Set(), // conversations left or removed from: late list answers and frames must not bring them back
  convCursor: null,
  peerConv: new Map(), // peer user id -> direct conversation id
  msgs: new Map(), // conversation id -> Map(seq -> message)
  current: null, // {id} or {peerId} (a direct conversation not started yet)
  typingSentAt: 0,
  roomDialogMode: 'create',
  helloCount: 0,
};

export function newConv(id) {
  return {
    id,
    kind: 'direct',
    name: null,
    peer: null,
    ownerId: null,
    members: null, // [{id, name}] once the room was fetched
    lastMessage: null,
    lastActivity: 0,
    lastReadSeq: 0,
    serverLastSeq: 0,
    serverUnread: 0,
    reads: new Map(), // user id -> seq they have read up to
    typing: new Map(), // user id -> timer
    notes: [], // membership lines: {afterSeq, text, n}
    history: { loaded: false, loading: false, atStart: false, nextBeforeSeq: null },
  };
}

export function userName(id) {
  if (S.me && id === S.me.id) return S.me.name;
  const u = S.users.get(id);
  return (u && u.name) || 'Someone';
}

/** Adds or updates a user; `online` stays null until the server has told us. */
export function rememberUser(u) {
  const old = S.users.get(u.id) || { id: u.id, online: null, last_seen: null };
  S.users.set(u.id, { ...old, ...Object.fromEntries(Object.entries(u).filter(([, v]) => v !== undefined)) });
}

/** The user's role in room `c` (null until its members are loaded). */
export function myRole(c) {
  const me = c && c.members && c.members.find((m) => m.id === S.me.id);
  return me ? me.role || 'member' : null;
}

export function convTitle(c) {
  if (c.kind === 'room') return c.name || 'Room';
  const peerId = c.peer && c.peer.id;
  return peerId ? userName(peerId) : 'Direct conversation';
}

export function storeOf(cid) {
  let m = S.msgs.get(cid);
  if (!m) S.msgs.set(cid, (m = new Map()));
  return m;
}

export function unreadOf(c) {
  let n = c.lastReadSeq >= c.serverLastSeq ? 0 : c.serverUnread;
  const floor = Math.max(c.serverLastSeq, c.lastReadSeq);
  for (const m of storeOf(c.id).values()) if (m.seq > floor && m.from !== S.me.id) n += 1;
  return n;
}
