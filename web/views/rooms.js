// Rooms: the New room and Add people dialog, leaving a room, and what membership changes do
// (a note in the conversation, a room that appears or goes away).

import { ApiError } from '../chat-client.js';
import { $, h, notify, showFieldError, showFormError } from './dom.js';
import { FIELD_TEXT, describeError } from './text.js';
import { S, convTitle, newConv, userName } from './state.js';
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

async function onLeaveRoom() {
  const c = currentConv();
  if (!c || c.kind !== 'room') return;
  if (!confirm(`Leave ${convTitle(c)}? You will stop getting its messages.`)) return;
  try {
    const title = convTitle(c);
    await S.api.removeMember(c.id, S.me.id);
    // The membership event may have removed the conversation before this answer came back.
    removeConv(c.id, null);
    notify(`You left ${title}.`);
  } catch (err) {
    notify(describeError(err, 'leave the room'));
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
  if (f.change === 'added') addNote(c, f.by === f.user_id ? `${who} joined.` : `${who} ${who === 'You' ? 'were' : 'was'} added by ${by}.`);
  else addNote(c, f.by === f.user_id ? `${who} left.` : `${who} ${who === 'You' ? 'were' : 'was'} removed by ${by}.`);
  if (c.kind === 'room') fetchRoom(c);
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
  $('room-leave').addEventListener('click', onLeaveRoom);
  $('room-form').addEventListener('submit', onRoomSubmit);
  $('room-cancel').addEventListener('click', () => $('room-dialog').close());
}
