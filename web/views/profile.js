// The profile dialog: the name and the picture, checked as the server checks them, then saved
// (PATCH /users/me).

import { ApiError } from '../chat-client.js';
import { $, h, notify, showFieldError, showFormError } from './dom.js';
import { FIELD_TEXT, avatarUrlProblem, describeError, nameProblem } from './text.js';
import { S } from './state.js';
import { setAvatar } from './avatar.js';
import { applyMe } from './session.js';

function openProfile() {
  $('profile-name').value = S.me.name;
  $('profile-avatar-url').value = S.me.avatar_url || '';
  $('profile-email').textContent = S.me.email || '';
  $('profile-id').textContent = S.me.id;
  setAvatar($('profile-avatar'), S.me);
  showFieldError('profile-name', '');
  showFieldError('profile-avatar-url', '');
  showFormError('profile-error', '');
  $('profile-dialog').showModal();
  $('profile-name').focus();
  renderBlocks();
}

/** The Blocked section: what the user refuses, each with a button that allows it again. */
async function renderBlocks() {
  let blocks;
  try {
    blocks = await S.api.blocks();
  } catch {
    $('profile-blocks').hidden = true;
    return;
  }
  const entries = [
    ...blocks.rooms.map((r) => [`Room ${r.name}`, () => S.api.unblockRoom(r.id)]),
    ...blocks.users.map((u) => [`${u.name} adding you to rooms`, () => S.api.unblockUser(u.id)]),
  ];
  $('profile-blocks').hidden = entries.length === 0;
  $('profile-blocks-list').replaceChildren(
    ...entries.map(([label, allow]) =>
      h(
        'li',
        {},
        h('span', {}, label),
        h('button', {
          type: 'button',
          class: 'secondary small',
          text: 'Allow',
          'aria-label': `Allow ${label}`,
          onclick: async () => {
            try {
              await allow();
            } catch (err) {
              notify(describeError(err, 'allow that'));
            }
            renderBlocks();
          },
        }),
      ),
    ),
  );
}

/** The values typed in the profile form, with the field errors the server would give. */
function profileInput() {
  const name = $('profile-name').value.trim();
  const avatarUrl = $('profile-avatar-url').value.trim();
  const nameCode = nameProblem(name);
  return {
    name,
    avatarUrl: avatarUrl || null,
    errors: {
      name: nameCode && FIELD_TEXT[nameCode],
      'avatar-url': avatarUrl ? avatarUrlProblem(avatarUrl) : null,
    },
  };
}

/** Shows the picture as it will look, once the address is complete (on change, not per key).
 *  Errors wait for Save: text appearing on blur would move the button being clicked. */
function previewProfileAvatar() {
  const { name, avatarUrl, errors } = profileInput();
  setAvatar($('profile-avatar'), { name: name || S.me.name, avatar_url: errors['avatar-url'] ? null : avatarUrl });
}

async function onProfileSave(e) {
  e.preventDefault();
  const { name, avatarUrl, errors } = profileInput();
  showFormError('profile-error', '');
  for (const [field, text] of Object.entries(errors)) showFieldError(`profile-${field}`, text);
  if (Object.values(errors).some(Boolean)) {
    $('profile-form').querySelector('[aria-invalid=true]')?.focus();
    return;
  }
  const changes = {};
  if (name !== S.me.name) changes.name = name;
  if (avatarUrl !== (S.me.avatar_url || null)) changes.avatar_url = avatarUrl;
  if (!Object.keys(changes).length) {
    $('profile-dialog').close();
    return;
  }
  const button = $('profile-save');
  button.disabled = true;
  try {
    applyMe(await S.api.updateMe(changes));
    $('profile-dialog').close();
    notify('Your profile was saved.');
  } catch (err) {
    if (err instanceof ApiError && err.fields) {
      for (const [field, code] of Object.entries(err.fields)) {
        showFieldError(field === 'avatar_url' ? 'profile-avatar-url' : `profile-${field}`, FIELD_TEXT[code] || 'This is not valid.');
      }
      $('profile-form').querySelector('[aria-invalid=true]')?.focus();
    }
    showFormError('profile-error', describeError(err, 'save your profile'));
  } finally {
    button.disabled = false;
  }
}

export function wireProfile() {
  $('profile-open').addEventListener('click', openProfile);
  $('profile-close').addEventListener('click', () => $('profile-dialog').close());
  $('profile-form').addEventListener('submit', onProfileSave);
  $('profile-avatar-url').addEventListener('change', previewProfileAvatar);
}
