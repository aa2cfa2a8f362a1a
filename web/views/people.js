// The People list and presence: the user's contacts (or everyone, as the server's
// `visibility` says), with Online or Offline, last seen; someone else found by their email;
// watching their status (presence.watch) so that it changes live. A click opens a direct conversation and
// a status change redraws the chat header, through the chat view's functions that app.js passes
// in (the chat view imports this module).

import { $, h, notify } from './dom.js';
import { describeError } from './text.js';
import { agoText, dateTimeFmt } from './time.js';
import { S, rememberUser } from './state.js';
import { avatar } from './avatar.js';

/** Set by app.js (wirePeople): `openDirect(userId)` and `renderSubtitle()` of the chat view. */
let chat = null;

/** Whether the search box holds an email address (found exactly, among everyone). */
const isEmail = (text) => /^[^\s@]+@[^\s@]+$/.test(text);

export async function loadPeople({ more = false } = {}) {
  const q = $('people-q').value.trim();
  const byEmail = isEmail(q);
  const page = byEmail
    ? await S.api.users({ email: q })
    : await S.api.users({ q: q || undefined, cursor: more ? S.usersCursor : undefined, limit: 100 });
  if (page.visibility) S.visibility = page.visibility;
  S.peopleSearch = byEmail ? 'email' : q ? 'name' : '';
  const before = new Set(S.peopleOrder);
  if (!more) S.peopleOrder = [];
  for (const u of page.users) {
    if (u.id === S.me.id) continue;
    rememberUser(u);
    if (!S.peopleOrder.includes(u.id)) S.peopleOrder.push(u.id);
  }
  S.usersCursor = page.next_cursor || null;
  const shown = new Set(S.peopleOrder);
  S.client.unwatch([...before].filter((id) => !shown.has(id)));
  // Someone found by email whose presence we may not see would be skipped by the server anyway.
  S.client.watch(S.peopleOrder.filter((id) => S.users.get(id).online !== null || !byEmail));
  renderPeople();
}

/** Watching answers at once with the user's status: ask for peers we have no status for. */
export function watchIfUnknown(userId) {
  const u = S.users.get(userId);
  if (u && u.online === null) S.client.watch([userId]);
}

export function presenceText(u) {
  if (u.online === null) return '';
  if (u.online) return 'Online';
  return u.last_seen ? `Offline, last seen ${agoText(u.last_seen)}` : 'Offline';
}

export function renderPeople() {
  const list = $('people-list');
  const focusedId = document.activeElement && document.activeElement.dataset.userId;
  list.replaceChildren(
    ...S.peopleOrder.map((id) => {
      const u = S.users.get(id);
      return h(
        'li',
        {},
        h(
          'button',
          {
            type: 'button',
            class: 'item person',
            dataset: { userId: id, online: String(!!u.online) },
            'aria-label': `${u.name}, ${presenceText(u)}. Send a message`,
            onclick: () => chat.openDirect(id),
          },
          avatar(u),
          h(
            'span',
            { class: 'item-main' },
            h('span', { class: 'item-title', text: u.name }),
            h(
              'span',
              { class: `item-sub presence ${u.online ? 'online' : 'offline'}`, title: u.last_seen ? dateTimeFmt.format(new Date(u.last_seen)) : null },
              u.online === null ? null : h('span', { class: 'dot', 'aria-hidden': 'true' }),
              presenceText(u),
            ),
          ),
        ),
      );
    }),
  );
  const contacts = S.visibility === 'contacts';
  $('people-hint').hidden = !contacts;
  $('people-hint').textContent = 'People you share a conversation with. Type someone\'s email address to find anyone else.';
  $('people-empty').textContent = {
    email: 'Nobody has that email address.',
    name: contacts ? 'None of your contacts has that name. Type an email address to find someone else.' : 'Nobody has that name.',
  }[S.peopleSearch] || (contacts ? 'No contacts yet. Type someone\'s email address to find them.' : 'Nobody else here yet.');
  $('people-empty').hidden = S.peopleOrder.length > 0;
  $('people-more').hidden = !S.usersCursor;
  if (focusedId) list.querySelector(`[data-user-id="${CSS.escape(focusedId)}"]`)?.focus();
}

export function onPresence(f) {
  const u = S.users.get(f.user_id);
  if (!u) return;
  u.online = f.status === 'online';
  if (!u.online) u.last_seen = f.ts;
  renderPeople();
  chat.renderSubtitle();
}

export function wirePeople(chatView) {
  chat = chatView;
  $('people-more').addEventListener('click', () => loadPeople({ more: true }).catch((err) => notify(describeError(err, 'load more people'))));
  $('people-refresh').addEventListener('click', () => loadPeople().catch((err) => notify(describeError(err, 'refresh the people list'))));
  let searchTimer = null;
  $('people-q').addEventListener('input', () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => loadPeople().catch((err) => notify(describeError(err, 'search'))), 250);
  });
  $('people-search').addEventListener('submit', (e) => e.preventDefault());
}
