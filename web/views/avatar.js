// Avatars: a person's initials, with their picture over them when they have a usable one. The
// top bar, the profile and both lists draw them.

import { h } from './dom.js';
import { avatarUrlProblem } from './text.js';

export function initials(name) {
  const parts = String(name || '?').trim().split(/\s+/).filter(Boolean);
  return ((parts[0] || '?')[0] + (parts.length > 1 ? parts[parts.length - 1][0] : '')).toUpperCase();
}

/** Picture URLs that failed to load: shown as initials from then on, not fetched again. */
const failedAvatars = new Set();

/** Fills an avatar with the person's initials and, when they have a usable `avatar_url`, their
 *  picture over them; a picture that fails to load is removed, so the initials show again.
 *  `data-avatar` says which: `loading`, `loaded` or `failed` (absent: initials only). */
export function setAvatar(el, person, text = initials(person && person.name)) {
  el.textContent = text;
  delete el.dataset.avatar;
  const url = person && person.avatar_url;
  if (!url || avatarUrlProblem(url)) return;
  if (failedAvatars.has(url)) {
    el.dataset.avatar = 'failed';
    return;
  }
  const img = document.createElement('img');
  img.alt = '';
  img.decoding = 'async';
  img.referrerPolicy = 'no-referrer';
  img.addEventListener('load', () => (el.dataset.avatar = 'loaded'));
  img.addEventListener('error', () => {
    failedAvatars.add(url);
    img.remove();
    el.dataset.avatar = 'failed';
  });
  el.dataset.avatar = 'loading';
  img.src = url;
  el.append(img);
}

export function avatar(person, text) {
  const el = h('span', { class: 'avatar', 'aria-hidden': 'true' });
  setAvatar(el, person, text);
  return el;
}
