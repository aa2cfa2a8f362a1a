// The logged-in session: starting it (the chat client, whose events it hands to the views that
// draw them), the top bar (who is logged in, the connection state) and signing out.

import { Api, ApiError, ChatClient } from '../chat-client.js';
import { $, notify } from './dom.js';
import { SIGNED_OUT_TEXT, describeError } from './text.js';
import { clearSession, setFlash, storeUser } from './session-store.js';
import { S, base } from './state.js';
import { setAvatar } from './avatar.js';
import { hideAuth } from './login.js';
import { loadPeople, onPresence, renderPeople } from './people.js';
import { loadConversations } from './conversation-list.js';
import { markRead, onMessage, onNewConversation, onRead, onTyping, renderSubtitle } from './conversation.js';
import { onMembership, onServerError } from './rooms.js';

const PEOPLE_REFRESH_MS = 30000;

/** Ends the session and starts the page afresh, with a message for the login form. */
export function signOut(message) {
  clearSession();
  if (S.client) S.client.close();
  if (message) setFlash(message);
  location.hash = '#login';
  location.reload();
}

export function startSession(token, user) {
  S.me = user;
  S.api = new Api(base, token);
  hideAuth();
  $('chat-app').hidden = false;
  $('account').hidden = false;
  renderMe();
  document.title = 'Chat';
  if (location.hash) history.replaceState(null, '', location.pathname + location.search);

  const client = new ChatClient({ base, token, userId: user.id });
  S.client = client;
  client.addEventListener('state', (e) => renderConnection(e.detail));
  client.addEventListener('hello', onHello);
  client.addEventListener('message', (e) => onMessage(e.detail.message));
  client.addEventListener('conversation', (e) => onNewConversation(e.detail));
  client.addEventListener('read', (e) => onRead(e.detail));
  client.addEventListener('typing', (e) => onTyping(e.detail));
  client.addEventListener('presence', (e) => onPresence(e.detail));
  client.addEventListener('membership', (e) => onMembership(e.detail));
  // After a resync, membership changes made meanwhile come only from the list (the client
  // re-syncs the conversations it holds by itself).
  client.addEventListener('resync', () => loadConversations().catch(() => {}));
  client.addEventListener('server-error', (e) => onServerError(e.detail));
  client.addEventListener('unauthorized', (e) =>
    signOut(SIGNED_OUT_TEXT[e.detail.reason] || 'Your session has ended. Please log in again.'),
  );
  client.connect();

  S.api.me().then(applyMe, (err) => {
    if (err instanceof ApiError && err.status === 401) signOut('Your session has ended. Please log in again.');
  });
  loadConversations().catch((err) => notify(describeError(err, 'load your conversations')));
  loadPeople().catch((err) => notify(describeError(err, 'load the people list')));
  setInterval(() => {
    if (!S.usersCursor && S.client && S.client.connected) loadPeople().catch(() => {});
    renderPeople();
    renderSubtitle();
  }, PEOPLE_REFRESH_MS);
  $('main').focus();
}

/** Takes the user as the server shows it (`GET`/`PATCH /users/me`) and shows it. */
export function applyMe(me) {
  S.me = { ...S.me, ...me };
  storeUser(S.me);
  renderMe();
}

function renderMe() {
  $('me-name').textContent = S.me.name;
  setAvatar($('me-avatar'), S.me);
}

function renderConnection({ state, retryInMs, nodeId }) {
  const conn = $('conn');
  conn.dataset.state = state;
  if (nodeId) conn.dataset.node = nodeId;
  else delete conn.dataset.node;
  $('conn-retry').hidden = state !== 'reconnecting' || !retryInMs;
  conn.title = '';
  let text;
  switch (state) {
    case 'connecting':
      text = 'Connecting…';
      break;
    case 'online':
      text = 'Connected';
      conn.title = `Connected to gateway node ${nodeId}`;
      break;
    case 'reconnecting':
      text = retryInMs ? `Connection lost. Reconnecting in ${Math.max(1, Math.round(retryInMs / 1000))} s…` : 'Reconnecting…';
      break;
    case 'expired':
      text = 'Signed out: your session expired';
      break;
    case 'stopped':
      text = 'Disconnected by the server. Reload the page to try again.';
      break;
    default:
      text = 'Not connected';
  }
  $('conn-text').textContent = text;
  $('composer-send').setAttribute('aria-disabled', state === 'online' ? 'false' : 'true');
}

function onHello() {
  S.helloCount += 1;
  // Recovery step 4: after a reconnect, conversations that appeared meanwhile are in the list.
  if (S.helloCount > 1) loadConversations().catch(() => {});
  markRead();
}

export function wireSession() {
  $('logout').addEventListener('click', () => signOut(null));
  $('conn-retry').addEventListener('click', () => S.client && S.client.reconnectNow());
}
