// The Chats list: direct conversations and rooms, most recent first, with unread counts and the
// tab's total; loading it and merging what the server says about a conversation into the state.
// A click opens the conversation and a reload redraws the chat header, through the chat view's
// functions that app.js passes in (the chat view imports this module).

import { $, h, notify } from './dom.js';
import { describeError } from './text.js';
import { PAGE_SIZE, S, convTitle, newConv, rememberUser, unreadOf, userName } from './state.js';
import { avatar, initials } from './avatar.js';
import { watchIfUnknown } from './people.js';

/** Set by app.js (wireConversationList): `openConversation(id)` and `renderChatHeader()` of the
 *  chat view. */
let chat = null;

export function upsertConv(data) {
  if (S.gone.has(data.id)) return null;
  const c = S.convs.get(data.id) || newConv(data.id);
  S.convs.set(data.id, c);
  c.kind = data.kind || c.kind;
  if (data.name) c.name = data.name;
  if (data.owner_id) c.ownerId = data.owner_id;
  if (data.members) {
    c.members = data.members;
    for (const m of data.members) {
      rememberUser(m);
      // Read positions from the server, so "Seen" survives a reload.
      if (m.id !== S.me.id && m.last_read_seq) c.reads.set(m.id, Math.max(c.reads.get(m.id) || 0, m.last_read_seq));
    }
  }
  if (data.peer) {
    c.peer = data.peer;
    if (data.peer.last_read_seq) {
      c.reads.set(data.peer.id, Math.max(c.reads.get(data.peer.id) || 0, data.peer.last_read_seq));
    }
    rememberUser(data.peer);
    S.peerConv.set(data.peer.id, c.id);
    watchIfUnknown(data.peer.id);
  }
  if (typeof data.last_seq === 'number') {
    c.serverLastSeq = data.last_seq;
    c.serverUnread = data.unread || 0;
    c.lastReadSeq = Math.max(c.lastReadSeq, data.last_read_seq || 0);
    // Held from the list's last_seq on: older messages are fetched as history when opened.
    S.client.track(c.id, data.last_seq);
  }
  if (data.last_message && (!c.lastMessage || data.last_message.seq > c.lastMessage.seq)) c.lastMessage = data.last_message;
  c.lastActivity = Math.max(c.lastActivity, data.last_activity_ts || 0);
  return c;
}

export async function loadConversations({ more = false } = {}) {
  const page = await S.api.conversations({ cursor: more ? S.convCursor : undefined, limit: PAGE_SIZE });
  for (const data of page.conversations) upsertConv(data);
  if (!more || page.next_cursor !== undefined) S.convCursor = page.next_cursor || null;
  renderConversations();
  if (S.current && S.current.id) chat.renderChatHeader();
}

let convRenderQueued = false;
export function renderConversations() {
  if (convRenderQueued) return;
  convRenderQueued = true;
  requestAnimationFrame(() => {
    convRenderQueued = false;
    const list = $('conversation-list');
    const focusedId = document.activeElement && document.activeElement.dataset.conversationId;
    const convs = [...S.convs.values()].sort((a, b) => b.lastActivity - a.lastActivity);
    let total = 0;
    list.replaceChildren(
      ...convs.map((c) => {
        const unread = unreadOf(c);
        total += unread;
        const last = c.lastMessage;
        const preview = last ? `${last.from === S.me.id ? 'You' : userName(last.from)}: ${last.body}` : 'No messages yet';
        const label = `${convTitle(c)}${c.kind === 'room' ? ' (room)' : ''}${unread ? `, ${unread} unread` : ''}`;
        return h(
          'li',
          {},
          h(
            'button',
            {
              type: 'button',
              class: 'item conv',
              dataset: { conversationId: c.id },
              'aria-current': S.current && S.current.id === c.id ? 'true' : null,
              'aria-label': label,
              onclick: () => chat.openConversation(c.id),
            },
            c.kind === 'room' ? avatar(null, '#') : avatar(c.peer && S.users.get(c.peer.id), initials(convTitle(c))),
            h(
              'span',
              { class: 'item-main' },
              h('span', { class: 'item-title', text: convTitle(c) }),
              h('span', { class: 'item-sub', text: preview }),
            ),
            unread ? h('span', { class: 'badge unread', text: String(unread), 'aria-hidden': 'true' }) : null,
          ),
        );
      }),
    );
    $('conversations-empty').hidden = convs.length > 0;
    $('conversations-more').hidden = !S.convCursor;
    $('unread-total').textContent = total ? String(total) : '';
    $('unread-total').hidden = !total;
    $('tab-conversations').setAttribute('aria-label', total ? `Chats, ${total} unread` : 'Chats');
    if (focusedId) list.querySelector(`[data-conversation-id="${CSS.escape(focusedId)}"]`)?.focus();
  });
}

let refreshTimer = null;
export function refreshConversationsSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => loadConversations().catch(() => {}), 300);
}

export function wireConversationList(chatView) {
  chat = chatView;
  $('conversations-more').addEventListener('click', () => loadConversations({ more: true }).catch((err) => notify(describeError(err, 'load more conversations'))));
}
