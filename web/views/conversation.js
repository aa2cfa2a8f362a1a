// One conversation: its messages (live, and older pages as history), the chat view around them
// (header, typing, receipts, the composer), read positions, and closing it when it is left or
// removed.

import { ApiError } from '../chat-client.js';
import { $, h, notify, showFormError } from './dom.js';
import { describeError } from './text.js';
import { dateTimeFmt, shortTime } from './time.js';
import { PAGE_SIZE, S, convTitle, myRole, newConv, rememberUser, storeOf, userName } from './state.js';
import { presenceText, watchIfUnknown } from './people.js';
import { refreshConversationsSoon, renderConversations, upsertConv } from './conversation-list.js';

const TYPING_SHOW_MS = 4000;
const TYPING_SEND_EVERY_MS = 1000;
const MAX_BODY_BYTES = 4096;

export function onNewConversation({ conversationId, message }) {
  if (S.gone.has(conversationId)) {
    S.client.untrack(conversationId);
    return;
  }
  const c = S.convs.get(conversationId) || newConv(conversationId);
  S.convs.set(conversationId, c);
  if (message.to) {
    c.kind = 'direct';
    const peerId = message.from === S.me.id ? message.to : message.from;
    c.peer = { id: peerId, name: userName(peerId) };
    S.peerConv.set(peerId, conversationId);
    if (!S.users.has(peerId)) rememberUser({ id: peerId });
    watchIfUnknown(peerId);
  } else {
    c.kind = 'room';
  }
  // The name of a room (and a peer we do not list) comes with the conversations list.
  refreshConversationsSoon();
}

export function onMessage(m) {
  const c = S.convs.get(m.conversation_id);
  if (!c) return;
  storeOf(c.id).set(m.seq, m);
  if (!c.lastMessage || m.seq > c.lastMessage.seq) c.lastMessage = m;
  c.lastActivity = Math.max(c.lastActivity, m.ts);
  if (m.from === S.me.id) c.lastReadSeq = Math.max(c.lastReadSeq, m.seq);
  stopTyping(c, m.from);
  // A direct conversation started from the People list becomes a real one with its first ack.
  if (S.current && S.current.peerId && c.peer && c.peer.id === S.current.peerId) {
    openConversation(c.id, { keepFocus: true });
  } else if (S.current && S.current.id === c.id) {
    insertMessage(c, m);
    renderReceipts(c);
    markRead();
  }
  renderConversations();
}

function isCurrent(c) {
  return S.current && S.current.id === c.id;
}

function messageItem(c, m) {
  const own = m.from === S.me.id;
  return h(
    'li',
    { class: `msg ${own ? 'own' : 'other'}`, dataset: { seq: String(m.seq), sort: String(m.seq), msgId: m.msg_id } },
    h(
      'p',
      { class: 'meta' },
      h('span', { class: 'author', text: own ? 'You' : userName(m.from) }),
      ' ',
      h('time', { datetime: new Date(m.ts).toISOString(), title: dateTimeFmt.format(new Date(m.ts)), text: shortTime(m.ts) }),
    ),
    h('p', { class: 'body', text: m.body }),
  );
}

/** Puts one element into the message list by its sort key (seq), keeping the list in order. */
function insertSorted(list, el) {
  const key = Number(el.dataset.sort);
  let after = null;
  for (let node = list.lastElementChild; node; node = node.previousElementSibling) {
    if (Number(node.dataset.sort) <= key) {
      after = node;
      break;
    }
  }
  if (after) after.after(el);
  else list.prepend(el);
}

function insertMessage(c, m) {
  const list = $('message-list');
  if (list.querySelector(`li[data-seq="${m.seq}"]`)) return;
  const scroller = $('messages-scroller');
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  insertSorted(list, messageItem(c, m));
  if (atBottom || m.from === S.me.id) scroller.scrollTop = scroller.scrollHeight;
}

function renderMessages(c) {
  const list = $('message-list');
  const items = [...storeOf(c.id).values()].sort((a, b) => a.seq - b.seq).map((m) => messageItem(c, m));
  list.replaceChildren(...items);
  for (const note of c.notes) insertSorted(list, noteItem(note));
  renderReceipts(c);
  const hs = c.history;
  $('history-more').hidden = !hs.loaded || hs.atStart;
  $('history-start').hidden = !hs.loaded || !hs.atStart || storeOf(c.id).size === 0;
}

function noteItem(note) {
  return h('li', { class: 'system', dataset: { sort: String(note.afterSeq + 0.5) } }, h('p', { text: note.text }));
}

export function addNote(c, text) {
  const note = { afterSeq: S.client.lastSeq(c.id), text };
  c.notes.push(note);
  if (c.notes.length > 100) c.notes.shift();
  if (isCurrent(c)) insertSorted($('message-list'), noteItem(note));
}

/** Loads the newest page (first open) or the page before the oldest held message. */
async function loadHistory(c, { older = false } = {}) {
  const hs = c.history;
  if (hs.loading || (older && hs.atStart)) return;
  hs.loading = true;
  $('history-more').disabled = true;
  try {
    const page = await S.api.messages(c.id, older ? { beforeSeq: hs.nextBeforeSeq, limit: PAGE_SIZE } : { limit: PAGE_SIZE });
    S.client.ingest(page.messages);
    const store = storeOf(c.id);
    for (const m of page.messages) store.set(m.seq, m);
    const newest = page.messages[page.messages.length - 1];
    if (newest && (!c.lastMessage || newest.seq > c.lastMessage.seq)) c.lastMessage = newest;
    hs.atStart = page.next_before_seq === undefined || page.next_before_seq === null;
    hs.nextBeforeSeq = page.next_before_seq;
    hs.loaded = true;
    if (isCurrent(c)) {
      const scroller = $('messages-scroller');
      const fromBottom = scroller.scrollHeight - scroller.scrollTop;
      renderMessages(c);
      // Older messages go above what the reader is looking at: keep it in place.
      scroller.scrollTop = older ? scroller.scrollHeight - fromBottom : scroller.scrollHeight;
      markRead();
    }
  } catch (err) {
    if (isCurrent(c)) notify(describeError(err, 'load the messages'));
  } finally {
    hs.loading = false;
    $('history-more').disabled = false;
  }
}

function showPane(pane) {
  $('chat-app').dataset.pane = pane;
}

export function openConversation(cid, { keepFocus = false } = {}) {
  const c = S.convs.get(cid);
  if (!c) return;
  const switching = !S.current || S.current.id !== cid;
  S.current = { id: cid };
  $('chat-placeholder').hidden = true;
  $('chat-pane').hidden = false;
  $('chat-pane').dataset.conversationId = cid;
  showPane('chat');
  renderChatHeader();
  renderMessages(c);
  renderTyping(c);
  if (switching) $('composer-error').hidden = true;
  $('messages-scroller').scrollTop = $('messages-scroller').scrollHeight;
  if (!c.history.loaded) loadHistory(c);
  if (c.kind === 'room' && !c.members) fetchRoom(c);
  markRead();
  renderConversations();
  if (!keepFocus) $('composer-input').focus();
}

export function openDirect(peerId) {
  const cid = S.peerConv.get(peerId);
  if (cid && S.convs.has(cid)) {
    openConversation(cid);
    return;
  }
  // No conversation yet: the first message, sent with `to`, creates it.
  S.current = { peerId };
  $('chat-placeholder').hidden = true;
  $('chat-pane').hidden = false;
  delete $('chat-pane').dataset.conversationId;
  showPane('chat');
  renderChatHeader();
  $('message-list').replaceChildren();
  $('history-more').hidden = true;
  $('history-start').hidden = true;
  $('typing').textContent = '';
  $('composer-error').hidden = true;
  renderConversations();
  $('composer-input').focus();
}

export function currentConv() {
  return S.current && S.current.id ? S.convs.get(S.current.id) : null;
}

export function renderChatHeader() {
  const c = currentConv();
  if (c) {
    $('chat-title').textContent = convTitle(c);
    $('room-actions').hidden = c.kind !== 'room';
  } else if (S.current && S.current.peerId) {
    $('chat-title').textContent = userName(S.current.peerId);
    $('room-actions').hidden = true;
  }
  renderSubtitle();
}

export function renderSubtitle() {
  if (!S.current) return;
  const c = currentConv();
  const sub = $('chat-subtitle');
  if (c && c.kind === 'room') {
    delete sub.dataset.online;
    // Only the owner and admins add people (unknown until the members are loaded).
    $('room-add').hidden = !['owner', 'admin'].includes(myRole(c));
    if (!c.members) sub.textContent = 'Room';
    else {
      const names = c.members.map((m) => (m.id === S.me.id ? 'you' : m.name));
      sub.textContent = `${c.members.length} member${c.members.length === 1 ? '' : 's'}: ${names.slice(0, 6).join(', ')}${names.length > 6 ? ', …' : ''}`;
    }
    return;
  }
  const peerId = c ? c.peer && c.peer.id : S.current.peerId;
  const u = peerId && S.users.get(peerId);
  sub.textContent = u ? presenceText(u) : '';
  sub.dataset.online = u ? String(!!u.online) : 'false';
}

export async function fetchRoom(c) {
  try {
    upsertConv(await S.api.room(c.id));
    if (isCurrent(c)) {
      renderSubtitle();
      renderReceipts(c);
    }
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) removeConv(c.id, 'You are no longer a member of this room.');
  }
}

/** Sends `read` for the open conversation when the page is in view and holds newer messages. */
export function markRead() {
  const c = currentConv();
  if (!c || document.visibilityState !== 'visible' || !S.client.connected) return;
  const seq = S.client.lastSeq(c.id);
  if (seq > c.lastReadSeq) {
    S.client.read(c.id, seq);
    c.lastReadSeq = seq;
    renderConversations();
  }
}

export function onRead(f) {
  const c = S.convs.get(f.conversation_id);
  if (!c) return;
  if (f.user_id === S.me.id) {
    c.lastReadSeq = Math.max(c.lastReadSeq, f.seq); // read on another device
    renderConversations();
    return;
  }
  c.reads.set(f.user_id, Math.max(c.reads.get(f.user_id) || 0, f.seq));
  if (isCurrent(c)) renderReceipts(c);
}

/** "Seen" under the newest own message another member has read (with their names in a room). */
function renderReceipts(c) {
  const list = $('message-list');
  for (const el of list.querySelectorAll('.receipt')) el.remove();
  const own = [...storeOf(c.id).values()].filter((m) => m.from === S.me.id).sort((a, b) => b.seq - a.seq);
  for (const m of own) {
    const readers = [...c.reads].filter(([, seq]) => seq >= m.seq).map(([id]) => userName(id));
    if (!readers.length) continue;
    const li = list.querySelector(`li[data-seq="${m.seq}"]`);
    if (li) li.append(h('p', { class: 'receipt', text: c.kind === 'room' ? `Seen by ${readers.join(', ')}` : 'Seen' }));
    break;
  }
}

export function onTyping(f) {
  const c = S.convs.get(f.conversation_id);
  if (!c || f.user_id === S.me.id) return;
  clearTimeout(c.typing.get(f.user_id));
  c.typing.set(f.user_id, setTimeout(() => stopTyping(c, f.user_id), TYPING_SHOW_MS));
  if (isCurrent(c)) renderTyping(c);
}

function stopTyping(c, userId) {
  if (!c.typing.has(userId)) return;
  clearTimeout(c.typing.get(userId));
  c.typing.delete(userId);
  if (isCurrent(c)) renderTyping(c);
}

function renderTyping(c) {
  const names = [...c.typing.keys()].map(userName);
  let text = '';
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = 'Several people are typing…';
  $('typing').textContent = text;
}

async function onSend(e) {
  e.preventDefault();
  const input = $('composer-input');
  const body = input.value;
  showFormError('composer-error', '');
  if (!body.trim() || !S.current) return;
  const bytes = new TextEncoder().encode(body).length;
  if (bytes > MAX_BODY_BYTES) {
    showFormError('composer-error', `That message is too long (${bytes} bytes). A message can be at most ${MAX_BODY_BYTES} bytes.`);
    return;
  }
  const target = S.current.id ? { conversationId: S.current.id } : { to: S.current.peerId };
  input.value = '';
  try {
    await S.client.send({ ...target, body });
  } catch (err) {
    // Keep the text, so that nothing typed is lost.
    if (!input.value) input.value = body;
    showFormError('composer-error', describeError(err, 'send the message'));
  }
}

function onComposerKey(e) {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
}

function onComposerInput() {
  const c = currentConv();
  if (!c || !$('composer-input').value) return;
  const now = Date.now();
  if (now - S.typingSentAt >= TYPING_SEND_EVERY_MS) {
    S.typingSentAt = now;
    S.client.typing(c.id);
  }
}

export function removeConv(cid, message) {
  const c = S.convs.get(cid);
  S.gone.add(cid);
  S.client.untrack(cid);
  S.convs.delete(cid);
  S.msgs.delete(cid);
  if (S.current && S.current.id === cid) closeChat();
  renderConversations();
  if (message && c) notify(message);
}

function closeChat() {
  S.current = null;
  $('chat-pane').hidden = true;
  $('chat-placeholder').hidden = false;
  showPane('list');
}

export function wireConversation() {
  $('chat-back').addEventListener('click', () => {
    const cid = S.current && S.current.id;
    showPane('list');
    const item = cid && $('conversation-list').querySelector(`[data-conversation-id="${CSS.escape(cid)}"]`);
    (item || $('tab-conversations')).focus();
  });
  $('composer').addEventListener('submit', onSend);
  $('composer-input').addEventListener('keydown', onComposerKey);
  $('composer-input').addEventListener('input', onComposerInput);
  $('history-more').addEventListener('click', () => {
    const c = currentConv();
    if (c) loadHistory(c, { older: true });
  });
  $('messages-scroller').addEventListener('scroll', () => {
    const c = currentConv();
    if (c && c.history.loaded && !c.history.atStart && $('messages-scroller').scrollTop < 40) loadHistory(c, { older: true });
  });
  document.addEventListener('visibilitychange', markRead);
  window.addEventListener('focus', markRead);
}
