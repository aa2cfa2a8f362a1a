// Rooms: the New room and Add people dialog, the Members dialog (roles, and what the user's own
// role lets them do), leaving a room (with blocks), and what membership changes do (a note in
// the conversation, a room that appears or goes away).

import { ApiError } from '../chat-client.js';
import { $, h, notify, showFieldError, showFormError } from './dom.js';
import { FIELD_TEXT, describeError } from './text.js';
import { S, convTitle, myRole, newConv, userName } from './state.js';
import { refreshConversationsSoon, renderConversations, upsertConv } from './conversation-list.js';
import { addNote, currentConv, fetchRoom, openConversation, removeConv, renderSubtitle } from './conversation.js';

function openRoomDialog(mode) {
  S.roomDialogMode = mode;
  const c = currentConv();
  $('room-dialog-title').textContent = mode === 'create' ? 'New room' : `Add people to ${convTitle(c)}`;
  $('room-name-field').hidden = mode !== 'create';
  $('room-submit').textContent = mode === 'create' ? 'Create room' : 'Add';
  $('room-members-legend').textContent = mode === 'create' ? 'Members (you can add more later)' : 'People to add';
  $('room-name').value = '';
  showFieldError('room-name', '');
  showFormError('room-error', '');
  const inRoom = new Set(mode === 'add' && c && c.members ? c.members.map((m) => m.id) : []);
  const candidates = S.peopleOrder.filter((id) => !inRoom.has(id));
  $('room-members').replaceChildren(
    ...candidates.map((id) =>
      h(
        'li',
        {},
        h('label', { class: 'check' }, h('input', { type: 'checkbox', value: id, name: 'member' }), ` ${userName(id)}`),
      ),
    ),
  );
  $('room-members-empty').hidden = candidates.length > 0;
  $('room-dialog').showModal();
  (mode === 'create' ? $('room-name') : $('room-members').querySelector('input') || $('room-cancel')).focus();
}

async function onRoomSubmit(e) {
  e.preventDefault();
  const ids = [...$('room-members').querySelectorAll('input:checked')].map((i) => i.value);
  showFieldError('room-name', '');
  showFormError('room-error', '');
  const button = $('room-submit');
  button.disabled = true;
  try {
    if (S.roomDialogMode === 'create') {
      const name = $('room-name').value.trim();
      if (!name) {
        showFieldError('room-name', FIELD_TEXT.name_required);
        $('room-name').focus();
        return;
      }
      const room = await S.api.createRoom(name, ids);
      const c = upsertConv({ ...room, last_seq: 0, unread: 0, last_read_seq: 0, last_activity_ts: Date.now() });
      c.history.loaded = true;
      c.history.atStart = true;
      $('room-dialog').close();
      openConversation(c.id);
    } else {
      const c = currentConv();
      if (!ids.length) {
        showFormError('room-error', FIELD_TEXT.required);
        return;
      }
      const room = await S.api.addMembers(c.id, ids);
      upsertConv(room);
      $('room-dialog').close();
      renderSubtitle();
      $('composer-input').focus();
    }
  } catch (err) {
    if (err instanceof ApiError && err.fields) {
      const texts = Object.values(err.fields).map((code) => FIELD_TEXT[code] || 'This is not valid.');
      if (err.fields.name) showFieldError('room-name', FIELD_TEXT[err.fields.name]);
      showFormError('room-error', texts.join(' '));
    } else {
      showFormError('room-error', describeError(err, S.roomDialogMode === 'create' ? 'create the room' : 'add those people'));
    }
  } finally {
    button.disabled = false;
  }
}

const ROLE_TEXT = { owner: 'Owner', admin: 'Admin', member: 'Member' };

/** The actions the user's role allows on member `m` of room `c`: [label, run] pairs. */
function memberActions(c, m) {
  const mine = myRole(c);
  if (m.id === S.me.id || !mine || mine === 'member') return [];
  const role = m.role || 'member';
  if (mine === 'admin') return role === 'member' ? [[`Remove ${m.name}`, () => S.api.removeMember(c.id, m.id)]] : [];
  const actions = [];
  if (role === 'member') actions.push([`Make ${m.name} an admin`, () => S.api.setRole(c.id, m.id, 'admin')]);
  if (role === 'admin') actions.push([`Make ${m.name} a member`, () => S.api.setRole(c.id, m.id, 'member')]);
  actions.push([`Make ${m.name} the owner`, () => S.api.setRole(c.id, m.id, 'owner')]);
  actions.push([`Remove ${m.name}`, () => S.api.removeMember(c.id, m.id)]);
  return actions;
}

/** Fills the Members dialog from the open room (it stays current while open). */
export function renderMembers() {
  const c = currentConv();
  if (!$('members-dialog').open || !c || !c.members) return;
  const mine = myRole(c);
  $('members-title').textContent = `Members of ${convTitle(c)}`;
  $('members-hint').textContent = {
    owner: 'You own this room: you add and remove people and choose the admins.',
    admin: 'You are an admin: you add people and remove members.',
  }[mine] || 'Only the owner and admins add or remove people.';
  $('members-list').replaceChildren(
    ...c.members.map((m) =>
      h(
        'li',
        { class: 'member', dataset: { userId: m.id } },
        h('span', { class: 'member-name' }, m.id === S.me.id ? `${m.name} (you)` : m.name),
        h('span', { class: `role role-${m.role || 'member'}` }, ROLE_TEXT[m.role || 'member']),
        ...memberActions(c, m).map(([label, run]) =>
          h('button', {
            type: 'button',
            class: label.startsWith('Remove') ? 'danger small' : 'secondary small',
            text: label.replace(` ${m.name}`, '').replace(m.name, ''),
            'aria-label': label,
            onclick: async (e) => {
              e.target.disabled = true;
              showFormError('members-error', '');
              try {
                await run();
                await fetchRoom(c);
                renderMembers();
              } catch (err) {
                showFormError('members-error', describeError(err, 'change that'));
                e.target.disabled = false;
              }
            },
          }),
        ),
      ),
    ),
  );
}

function openMembers() {
  showFormError('members-error', '');
  $('members-dialog').showModal();
  renderMembers();
  $('members-close').focus();
}

function openLeave() {
  const c = currentConv();
  if (!c || c.kind !== 'room') return;
  $('leave-title').textContent = `Leave ${convTitle(c)}?`;
  $('leave-block-room').checked = false;
  $('leave-block-adder').checked = false;
  showFormError('leave-error', '');
  $('leave-dialog').showModal();
  $('leave-cancel').focus();
}

async function onLeaveRoom(e) {
  e.preventDefault();
  const c = currentConv();
  if (!c || c.kind !== 'room') return;
  const block = [];
  if ($('leave-block-room').checked) block.push('room');
  if ($('leave-block-adder').checked) block.push('adder');
  try {
    const title = convTitle(c);
    await S.api.removeMember(c.id, S.me.id, { block });
    $('leave-dialog').close();
    // The membership event may have removed the conversation before this answer came back.
    removeConv(c.id, null);
    notify(`You left ${title}.`);
  } catch (err) {
    showFormError('leave-error', describeError(err, 'leave the room'));
  }
}

export function onMembership(f) {
  const c = S.convs.get(f.conversation_id);
  const who = f.user_id === S.me.id ? 'You' : userName(f.user_id);
  const by = f.by === S.me.id ? 'you' : userName(f.by);
  if (f.user_id === S.me.id && f.change === 'removed') {
    if (c) removeConv(f.conversation_id, f.by === S.me.id ? null : `You were removed from ${convTitle(c)}.`);
    return;
  }
  if (f.user_id === S.me.id && f.change === 'added') S.gone.delete(f.conversation_id);
  if (f.user_id === S.me.id && f.change === 'added' && !c) {
    const fresh = newConv(f.conversation_id);
    fresh.kind = 'room';
    fresh.lastActivity = Date.now();
    fresh.history.loaded = false;
    S.convs.set(f.conversation_id, fresh);
    fetchRoom(fresh).then(renderConversations);
    refreshConversationsSoon();
    return;
  }
  if (!c) return;
  if (f.change === 'role') {
    const role = { owner: 'the owner', admin: 'an admin', member: 'a member' }[f.role] || f.role;
    addNote(c, `${who} ${who === 'You' ? 'are' : 'is'} now ${role}.`);
    fetchRoom(c).then(renderMembers);
    return;
  }
  if (f.change === 'added') addNote(c, f.by === f.user_id ? `${who} joined.` : `${who} ${who === 'You' ? 'were' : 'was'} added by ${by}.`);
  else addNote(c, f.by === f.user_id ? `${who} left.` : `${who} ${who === 'You' ? 'were' : 'was'} removed by ${by}.`);
  if (c.kind === 'room') fetchRoom(c).then(renderMembers);
}

export function onServerError(f) {
  if (f.during === 'sync' && f.code === 'forbidden') {
    removeConv(f.conversation_id, null);
    return;
  }
  if (f.code === 'forbidden') refreshConversationsSoon();
  else if (f.code === 'unavailable') notify(describeError(new ApiError(0, f.code, f.message)));
}

export function wireRooms() {
  $('new-room').addEventListener('click', () => openRoomDialog('create'));
  $('room-add').addEventListener('click', () => openRoomDialog('add'));
  $('room-members-open').addEventListener('click', openMembers);
  $('members-close').addEventListener('click', () => $('members-dialog').close());
  $('room-leave').addEventListener('click', openLeave);
  $('leave-form').addEventListener('submit', onLeaveRoom);
  $('leave-cancel').addEventListener('click', () => $('leave-dialog').close());
  $('room-form').addEventListener('submit', onRoomSubmit);
  $('room-cancel').addEventListener('click', () => $('room-dialog').close());
}
