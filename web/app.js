// The web client's page: log in, register, forgot and reset password, the profile, the people and
// conversation lists, the chat view and rooms, drawn from the state that chat-client.js keeps in
// step with the server. Every piece of text from the server or a user is set with textContent,
// never parsed as HTML.

import { Api, ApiError, ChatClient, apiBaseFrom, tokenExpiry } from './chat-client.js';

const SESSION_KEY = 'chat.session';
const FLASH_KEY = 'chat.flash';
/** A reset link is `<page>#reset_token=<token>`; the token is kept for this tab under this key
 *  until it is used, refused, or the person leaves the reset page. */
const RESET_LINK_PARAM = 'reset_token';
const RESET_KEY = 'chat.reset_token';
const MIN_PASSWORD_CHARS = 8;
const MAX_PASSWORD_BYTES = 1024;
const MAX_NAME_CHARS = 100;
const MAX_EMAIL_BYTES = 254;
const MAX_AVATAR_URL_BYTES = 2048;
const PAGE_SIZE = 50;
const TYPING_SHOW_MS = 4000;
const TYPING_SEND_EVERY_MS = 1000;
const MAX_BODY_BYTES = 4096;
const PEOPLE_REFRESH_MS = 30000;

const base = apiBaseFrom();
const $ = (id) => document.getElementById(id);

/** Builds an element; strings become text nodes, so user data is never parsed as markup. */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key === 'text') el.textContent = value;
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return el;
}

// ---------------------------------------------------------------------------------------------
// Errors in words a person understands

const FIELD_TEXT = {
  name_required: 'Please enter a name.',
  name_invalid: 'Use at most 100 characters, and no control characters.',
  email_invalid: 'Please enter a valid email address, like name@example.com.',
  password_too_short: 'Use at least 8 characters.',
  password_too_long: 'That password is too long.',
  unknown_user: 'One of the people you picked no longer has an account.',
  too_many: 'That is more people than a room can hold.',
  room_limit_reached: 'Someone you picked (or you) is already in too many rooms.',
  room_full: 'This room is full.',
  required: 'Pick at least one person.',
  avatar_url_invalid: 'Use the https:// address of a picture, like https://example.com/me.png, with no spaces.',
  token_invalid: 'This reset link has expired or was already used.',
};

const SIGNED_OUT_TEXT = {
  token_expired: 'Your session has expired. Please log in again.',
  token_revoked: 'Your password was changed, so you were logged out here. Please log in with your new password.',
};
const PASSWORD_CHANGED_TEXT = 'Your password has been changed. Log in with your new password.';

// ---------------------------------------------------------------------------------------------
// The server's field rules (protocol.md), checked before asking it

const utf8Length = (text) => new TextEncoder().encode(text).length;
const BAD_URL_CHARS = /[\p{White_Space}\p{Cc}]/u;

/** The field code for a (trimmed) display name, as for register and PATCH /users/me. */
function nameProblem(name) {
  if (!name) return 'name_required';
  if ([...name].length > MAX_NAME_CHARS || /\p{Cc}/u.test(name)) return 'name_invalid';
  return null;
}

function passwordProblem(password) {
  if ([...password].length < MIN_PASSWORD_CHARS) return 'password_too_short';
  if (utf8Length(password) > MAX_PASSWORD_BYTES) return 'password_too_long';
  return null;
}

/** The server's email rule: no whitespace or control characters, one `@` with text before it,
 *  a domain with a dot that does not start or end with one, at most 254 bytes. */
function emailIsValid(email) {
  if (utf8Length(email) > MAX_EMAIL_BYTES || BAD_URL_CHARS.test(email)) return false;
  const at = email.indexOf('@');
  if (at <= 0) return false;
  const domain = email.slice(at + 1);
  return !domain.includes('@') && domain.includes('.') && !domain.startsWith('.') && !domain.endsWith('.');
}

/** Why an avatar URL would be refused, in words, or null when the server accepts it: an
 *  `https://` URL with a host (no `@` in it), no whitespace or control characters, at most
 *  2,048 bytes. */
function avatarUrlProblem(url) {
  if (!url.startsWith('https://')) {
    return /^http:\/\//i.test(url)
      ? 'Use an address that starts with https://. Pictures over plain http:// are not allowed.'
      : 'Use a web address that starts with https://, like https://example.com/me.png.';
  }
  if (BAD_URL_CHARS.test(url)) return 'A web address cannot contain spaces or line breaks.';
  if (utf8Length(url) > MAX_AVATAR_URL_BYTES) return 'That address is too long: use one of at most 2,048 characters.';
  const host = url.slice('https://'.length).split(/[/?#]/)[0];
  if (!host) return 'That address has no site name after https://, like https://example.com/me.png.';
  if (host.includes('@')) return 'Use an address without a user name or @ before the site name.';
  return null;
}

function describeError(err, doing = '') {
  const prefix = doing ? `Could not ${doing}. ` : '';
  if (!(err instanceof ApiError)) return `${prefix}Something unexpected went wrong. Please try again.`;
  switch (err.code) {
    case 'network':
      return `${prefix}The server cannot be reached. Check your connection and try again.`;
    case 'offline':
      return `${prefix}You are not connected right now. Wait until the connection is back, then try again.`;
    case 'connection_lost':
      return `${prefix}The connection was lost for too long. Check the conversation before sending again.`;
    case 'timeout':
      return `${prefix}The server did not answer in time. Check the conversation before sending again.`;
    case 'invalid_credentials':
      return 'That email and password do not match an account.';
    case 'email_taken':
      return 'An account with this email already exists. Log in instead.';
    case 'validation_failed':
      return `${prefix}Please check the highlighted fields.`;
    case 'unauthorized':
      return 'Your session has ended. Please log in again.';
    case 'rate_limited':
      return `${prefix}You are sending too fast. Wait a moment, then send again.`;
    case 'too_large':
      return `${prefix}That is too long. A message can be at most 4096 bytes.`;
    case 'forbidden':
      return `${prefix}You are not allowed to do that here. You may no longer be a member.`;
    case 'not_found':
      return `${prefix}That person or conversation does not exist any more.`;
    case 'unavailable':
      return `${prefix}The server is having trouble right now. Please try again in a moment.`;
    case 'bad_request':
      return `${prefix}The server did not accept that${err.message ? ` (${err.message})` : ''}.`;
    default:
      return `${prefix}Something went wrong on the server. Please try again.`;
  }
}

let noticeTimer = null;
function notify(text, { sticky = false } = {}) {
  $('notice-text').textContent = text;
  $('notice').hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => ($('notice').hidden = true), 10000);
}

function showFieldError(id, text) {
  const el = $(`${id}-error`);
  if (!el) return;
  el.textContent = text || '';
  el.hidden = !text;
  const input = $(id);
  if (input) {
    if (text) input.setAttribute('aria-invalid', 'true');
    else input.removeAttribute('aria-invalid');
  }
}

function showFormError(id, text) {
  $(id).textContent = text || '';
  $(id).hidden = !text;
}

// ---------------------------------------------------------------------------------------------
// Times

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dateTimeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

function shortTime(ts) {
  const d = new Date(ts);
  return d.toDateString() === new Date().toDateString() ? timeFmt.format(d) : dateTimeFmt.format(d);
}

function agoText(ts) {
  const s = Math.max(0, Math.round((Date.now() - ts) / 1000));
  if (s < 60) return 'just now';
  const m = Math.round(s / 60);
  if (m < 60) return `${m} minute${m === 1 ? '' : 's'} ago`;
  const hrs = Math.round(m / 60);
  if (hrs < 24) return `${hrs} hour${hrs === 1 ? '' : 's'} ago`;
  return `on ${dateTimeFmt.format(new Date(ts))}`;
}

// ---------------------------------------------------------------------------------------------
// The stored session: "remember me" keeps the token in localStorage, otherwise only for this tab.

function loadSession() {
  for (const store of [localStorage, sessionStorage]) {
    try {
      const s = JSON.parse(store.getItem(SESSION_KEY) || 'null');
      if (s && s.token && s.user) return s;
    } catch {
      store.removeItem(SESSION_KEY);
    }
  }
  return null;
}

function saveSession(token, user, remember) {
  clearSession();
  (remember ? localStorage : sessionStorage).setItem(SESSION_KEY, JSON.stringify({ token, user }));
}

function clearSession() {
  localStorage.removeItem(SESSION_KEY);
  sessionStorage.removeItem(SESSION_KEY);
}

/** Keeps the stored copy of the user up to date, so that a reload shows the new name at once. */
function storeUser(user) {
  for (const store of [localStorage, sessionStorage]) {
    try {
      const s = JSON.parse(store.getItem(SESSION_KEY) || 'null');
      if (s && s.token && s.user && s.user.id === user.id) store.setItem(SESSION_KEY, JSON.stringify({ ...s, user }));
    } catch {
      // a broken entry is dropped by loadSession
    }
  }
}

/** Ends the session and starts the page afresh, with a message for the login form. */
function signOut(message) {
  clearSession();
  if (S.client) S.client.close();
  if (message) sessionStorage.setItem(FLASH_KEY, message);
  location.hash = '#login';
  location.reload();
}

// ---------------------------------------------------------------------------------------------
// State

const S = {
  api: null,
  client: null,
  me: null,
  users: new Map(), // id -> {id, name, online, last_seen}
  peopleOrder: [], // ids shown in the People list
  usersCursor: null,
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

function newConv(id) {
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

function userName(id) {
  if (S.me && id === S.me.id) return S.me.name;
  const u = S.users.get(id);
  return (u && u.name) || 'Someone';
}

/** Adds or updates a user; `online` stays null until the server has told us. */
function rememberUser(u) {
  const old = S.users.get(u.id) || { id: u.id, online: null, last_seen: null };
  S.users.set(u.id, { ...old, ...Object.fromEntries(Object.entries(u).filter(([, v]) => v !== undefined)) });
}

function convTitle(c) {
  if (c.kind === 'room') return c.name || 'Room';
  const peerId = c.peer && c.peer.id;
  return peerId ? userName(peerId) : 'Direct conversation';
}

function storeOf(cid) {
  let m = S.msgs.get(cid);
  if (!m) S.msgs.set(cid, (m = new Map()));
  return m;
}

function unreadOf(c) {
  let n = c.lastReadSeq >= c.serverLastSeq ? 0 : c.serverUnread;
  const floor = Math.max(c.serverLastSeq, c.lastReadSeq);
  for (const m of storeOf(c.id).values()) if (m.seq > floor && m.from !== S.me.id) n += 1;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Auth views

const AUTH_VIEWS = ['login', 'register', 'forgot', 'reset'];
const AUTH_TITLES = { login: 'Log in', register: 'Create an account', forgot: 'Forgot password', reset: 'Choose a new password' };

function showAuth(view) {
  $('chat-app').hidden = true;
  $('account').hidden = true;
  for (const v of AUTH_VIEWS) $(`${v}-view`).hidden = v !== view;
  document.title = `${AUTH_TITLES[view]} – Chat`;
  showNote('login-note', '');
  if (view === 'forgot') prepareForgot();
  if (view === 'reset') prepareReset();
  $(`${view}-title`).focus();
}

function showNote(id, text) {
  $(id).textContent = text || '';
  $(id).hidden = !text;
}

/** Replaces the address's fragment without a navigation (and without a hashchange). */
function replaceHash(hash) {
  history.replaceState(null, '', `${location.pathname}${location.search}${hash}`);
}

/** A reset link (`/#reset_token=<token>`): keeps the token for this tab and takes it out of the
 *  address bar (and so out of the history and of bookmarks). */
function takeResetLink() {
  const token = new URLSearchParams(location.hash.slice(1)).get(RESET_LINK_PARAM);
  if (token === null) return false;
  sessionStorage.setItem(RESET_KEY, token.trim());
  replaceHash('#reset');
  return true;
}

/** Shows the page the address asks for: a reset link or page, a stored session, or an
 *  auth page (log in, sign up, forgot password). */
function route() {
  const fromLink = takeResetLink();
  if (S.client) {
    // A reset link opened while logged in: start afresh, on the reset page.
    if (fromLink) location.reload();
    return;
  }
  const view = location.hash.replace('#', '');
  if (view === 'reset') {
    showAuth('reset');
    return;
  }
  sessionStorage.removeItem(RESET_KEY);
  const session = loadSession();
  if (session) {
    const exp = tokenExpiry(session.token);
    if (exp !== null && exp <= Date.now()) {
      clearSession();
      showAuth('login');
      showFormError('login-error', SIGNED_OUT_TEXT.token_expired);
      return;
    }
    startSession(session.token, session.user);
    return;
  }
  showAuth(['register', 'forgot'].includes(view) ? view : 'login');
}

// Forgot password: ask for a reset link. The answer is the same whether or not the email has an
// account, so the page says "if an account exists".

function prepareForgot() {
  $('forgot-form').hidden = false;
  $('forgot-sent').hidden = true;
  showFormError('forgot-error', '');
  showFieldError('forgot-email', '');
  if (!$('forgot-email').value) $('forgot-email').value = $('login-email').value.trim();
}

async function onForgot(e) {
  e.preventDefault();
  const email = $('forgot-email').value.trim();
  showFormError('forgot-error', '');
  showFieldError('forgot-email', '');
  if (!email || !emailIsValid(email)) {
    showFieldError('forgot-email', email ? FIELD_TEXT.email_invalid : 'Please enter your email.');
    $('forgot-email').focus();
    return;
  }
  const button = e.submitter || $('forgot-form').querySelector('button[type=submit]');
  button.disabled = true;
  try {
    await new Api(base).requestPasswordReset(email);
    $('forgot-sent-text').textContent = `If an account exists for ${email}, we sent a link to reset its password to that address.`;
    $('forgot-form').hidden = true;
    $('forgot-sent').hidden = false;
  } catch (err) {
    showFormError('forgot-error', describeError(err, 'send the reset link'));
  } finally {
    button.disabled = false;
  }
}

// Reset password: the page a reset link opens. The new password twice, then confirm.

function prepareReset() {
  const token = sessionStorage.getItem(RESET_KEY);
  $('reset-password').value = '';
  $('reset-confirm').value = '';
  for (const f of ['password', 'confirm']) showFieldError(`reset-${f}`, '');
  showFormError('reset-error', '');
  $('reset-form').hidden = !token;
  $('reset-invalid').hidden = !!token;
  if (!token) $('reset-invalid-text').textContent = 'This page needs the link from your password reset email. Open that link again, or request a new one.';
}

function resetLinkRefused() {
  sessionStorage.removeItem(RESET_KEY);
  $('reset-form').hidden = true;
  $('reset-invalid-text').textContent = 'This reset link has expired or was already used. Request a new link, and use the newest one you get.';
  $('reset-invalid').hidden = false;
  $('reset-invalid').querySelector('a').focus();
}

async function onReset(e) {
  e.preventDefault();
  const token = sessionStorage.getItem(RESET_KEY);
  const password = $('reset-password').value;
  const confirm = $('reset-confirm').value;
  showFormError('reset-error', '');
  for (const f of ['password', 'confirm']) showFieldError(`reset-${f}`, '');
  if (!token) {
    prepareReset();
    return;
  }
  const problem = passwordProblem(password);
  if (problem) showFieldError('reset-password', FIELD_TEXT[problem]);
  if (password !== confirm) showFieldError('reset-confirm', 'The two passwords do not match.');
  if (problem || password !== confirm) {
    $('reset-form').querySelector('[aria-invalid=true]')?.focus();
    return;
  }
  const button = e.submitter || $('reset-form').querySelector('button[type=submit]');
  button.disabled = true;
  try {
    await new Api(base).confirmPasswordReset(token, password);
    sessionStorage.removeItem(RESET_KEY);
    // Every token issued before the reset is refused now, this browser's included.
    clearSession();
    $('reset-password').value = '';
    $('reset-confirm').value = '';
    replaceHash('#login');
    showAuth('login');
    showNote('login-note', PASSWORD_CHANGED_TEXT);
  } catch (err) {
    const fields = (err instanceof ApiError && err.fields) || {};
    if (fields.token === 'token_invalid') {
      resetLinkRefused();
    } else if (fields.new_password) {
      showFieldError('reset-password', FIELD_TEXT[fields.new_password] || 'This password is not accepted.');
      $('reset-password').focus();
    } else {
      showFormError('reset-error', describeError(err, 'change the password'));
    }
  } finally {
    button.disabled = false;
  }
}

function wirePasswordToggle(checkboxId, inputIds) {
  $(checkboxId).addEventListener('change', (e) => {
    for (const id of inputIds) $(id).type = e.target.checked ? 'text' : 'password';
  });
}

async function onLogin(e) {
  e.preventDefault();
  const email = $('login-email').value.trim();
  const password = $('login-password').value;
  showFormError('login-error', '');
  showFieldError('login-email', email ? '' : 'Please enter your email.');
  showFieldError('login-password', password ? '' : 'Please enter your password.');
  if (!email || !password) return;
  const button = e.submitter || $('login-form').querySelector('button[type=submit]');
  button.disabled = true;
  try {
    const res = await new Api(base).login({ email, password });
    saveSession(res.token, res.user, $('login-remember').checked);
    startSession(res.token, res.user);
  } catch (err) {
    showFormError('login-error', describeError(err, 'log in'));
  } finally {
    button.disabled = false;
  }
}

async function onRegister(e) {
  e.preventDefault();
  const name = $('register-name').value.trim();
  const email = $('register-email').value.trim();
  const password = $('register-password').value;
  const confirm = $('register-confirm').value;
  showFormError('register-error', '');
  for (const f of ['name', 'email', 'password', 'confirm']) showFieldError(`register-${f}`, '');
  const nameCode = nameProblem(name);
  const passwordCode = passwordProblem(password);
  const problems = [
    [nameCode, 'register-name', FIELD_TEXT[nameCode]],
    [!email, 'register-email', 'Please enter your email.'],
    [passwordCode, 'register-password', FIELD_TEXT[passwordCode]],
    [password !== confirm, 'register-confirm', 'The two passwords do not match.'],
  ].filter(([bad]) => bad);
  for (const [, id, text] of problems) showFieldError(id, text);
  if (problems.length) {
    $('register-form').querySelector('[aria-invalid=true]')?.focus();
    return;
  }
  const button = e.submitter || $('register-form').querySelector('button[type=submit]');
  button.disabled = true;
  try {
    const res = await new Api(base).register({ name, email, password });
    saveSession(res.token, res.user, $('register-remember').checked);
    startSession(res.token, res.user);
  } catch (err) {
    if (err instanceof ApiError && err.fields) {
      for (const [field, code] of Object.entries(err.fields)) {
        showFieldError(`register-${field}`, FIELD_TEXT[code] || 'This is not valid.');
      }
      $('register-form').querySelector('[aria-invalid=true]')?.focus();
    }
    if (err instanceof ApiError && err.code === 'email_taken') showFieldError('register-email', describeError(err));
    showFormError('register-error', describeError(err, 'create the account'));
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// The session

function startSession(token, user) {
  S.me = user;
  S.api = new Api(base, token);
  for (const v of AUTH_VIEWS) $(`${v}-view`).hidden = true;
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
function applyMe(me) {
  S.me = { ...S.me, ...me };
  storeUser(S.me);
  renderMe();
}

function renderMe() {
  $('me-name').textContent = S.me.name;
  setAvatar($('me-avatar'), S.me);
}

// ---------------------------------------------------------------------------------------------
// Profile: name and picture (PATCH /users/me)

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

// ---------------------------------------------------------------------------------------------
// Conversations list

function upsertConv(data) {
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

async function loadConversations({ more = false } = {}) {
  const page = await S.api.conversations({ cursor: more ? S.convCursor : undefined, limit: PAGE_SIZE });
  for (const data of page.conversations) upsertConv(data);
  if (!more || page.next_cursor !== undefined) S.convCursor = page.next_cursor || null;
  renderConversations();
  if (S.current && S.current.id) renderChatHeader();
}

let convRenderQueued = false;
function renderConversations() {
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
              onclick: () => openConversation(c.id),
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

function initials(name) {
  const parts = String(name || '?').trim().split(/\s+/).filter(Boolean);
  return ((parts[0] || '?')[0] + (parts.length > 1 ? parts[parts.length - 1][0] : '')).toUpperCase();
}

/** Picture URLs that failed to load: shown as initials from then on, not fetched again. */
const failedAvatars = new Set();

/** Fills an avatar with the person's initials and, when they have a usable `avatar_url`, their
 *  picture over them; a picture that fails to load is removed, so the initials show again.
 *  `data-avatar` says which: `loading`, `loaded` or `failed` (absent: initials only). */
function setAvatar(el, person, text = initials(person && person.name)) {
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

function avatar(person, text) {
  const el = h('span', { class: 'avatar', 'aria-hidden': 'true' });
  setAvatar(el, person, text);
  return el;
}

// ---------------------------------------------------------------------------------------------
// People list and presence

async function loadPeople({ more = false } = {}) {
  const q = $('people-q').value.trim();
  const page = await S.api.users({ q: q || undefined, cursor: more ? S.usersCursor : undefined, limit: 100 });
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
  S.client.watch(S.peopleOrder);
  renderPeople();
}

/** Watching answers at once with the user's status: ask for peers we have no status for. */
function watchIfUnknown(userId) {
  const u = S.users.get(userId);
  if (u && u.online === null) S.client.watch([userId]);
}

function presenceText(u) {
  if (u.online === null) return '';
  if (u.online) return 'Online';
  return u.last_seen ? `Offline, last seen ${agoText(u.last_seen)}` : 'Offline';
}

function renderPeople() {
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
            onclick: () => openDirect(id),
          },
          avatar(u),
          h(
            'span',
            { class: 'item-main' },
            h('span', { class: 'item-title', text: u.name }),
            h(
              'span',
              { class: `item-sub presence ${u.online ? 'online' : 'offline'}`, title: u.last_seen ? dateTimeFmt.format(new Date(u.last_seen)) : null },
              h('span', { class: 'dot', 'aria-hidden': 'true' }),
              presenceText(u),
            ),
          ),
        ),
      );
    }),
  );
  $('people-empty').hidden = S.peopleOrder.length > 0;
  $('people-more').hidden = !S.usersCursor;
  if (focusedId) list.querySelector(`[data-user-id="${CSS.escape(focusedId)}"]`)?.focus();
}

function onPresence(f) {
  const u = S.users.get(f.user_id);
  if (!u) return;
  u.online = f.status === 'online';
  if (!u.online) u.last_seen = f.ts;
  renderPeople();
  renderSubtitle();
}

// ---------------------------------------------------------------------------------------------
// Messages

function onNewConversation({ conversationId, message }) {
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

let refreshTimer = null;
function refreshConversationsSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => loadConversations().catch(() => {}), 300);
}

function onMessage(m) {
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

function addNote(c, text) {
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

// ---------------------------------------------------------------------------------------------
// The chat view

function showPane(pane) {
  $('chat-app').dataset.pane = pane;
}

function openConversation(cid, { keepFocus = false } = {}) {
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

function openDirect(peerId) {
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

function currentConv() {
  return S.current && S.current.id ? S.convs.get(S.current.id) : null;
}

function renderChatHeader() {
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

function renderSubtitle() {
  if (!S.current) return;
  const c = currentConv();
  const sub = $('chat-subtitle');
  if (c && c.kind === 'room') {
    delete sub.dataset.online;
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

async function fetchRoom(c) {
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
function markRead() {
  const c = currentConv();
  if (!c || document.visibilityState !== 'visible' || !S.client.connected) return;
  const seq = S.client.lastSeq(c.id);
  if (seq > c.lastReadSeq) {
    S.client.read(c.id, seq);
    c.lastReadSeq = seq;
    renderConversations();
  }
}

function onRead(f) {
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

function onTyping(f) {
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

// ---------------------------------------------------------------------------------------------
// Rooms

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

function removeConv(cid, message) {
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

function onMembership(f) {
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

function onServerError(f) {
  if (f.during === 'sync' && f.code === 'forbidden') {
    removeConv(f.conversation_id, null);
    return;
  }
  if (f.code === 'forbidden') refreshConversationsSoon();
  else if (f.code === 'unavailable') notify(describeError(new ApiError(0, f.code, f.message)));
}

// ---------------------------------------------------------------------------------------------
// Wiring

function selectTab(which) {
  const tabs = { conversations: $('tab-conversations'), people: $('tab-people') };
  for (const [name, tab] of Object.entries(tabs)) {
    const on = name === which;
    tab.setAttribute('aria-selected', String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`${name}-panel`).hidden = !on;
  }
  if (which === 'people' && !S.peopleOrder.length) loadPeople().catch((err) => notify(describeError(err, 'load the people list')));
}

function wire() {
  $('login-form').addEventListener('submit', onLogin);
  $('register-form').addEventListener('submit', onRegister);
  $('forgot-form').addEventListener('submit', onForgot);
  $('forgot-again').addEventListener('click', () => {
    prepareForgot();
    $('forgot-email').focus();
  });
  $('reset-form').addEventListener('submit', onReset);
  wirePasswordToggle('login-show', ['login-password']);
  wirePasswordToggle('register-show', ['register-password', 'register-confirm']);
  wirePasswordToggle('reset-show', ['reset-password', 'reset-confirm']);
  window.addEventListener('hashchange', route);
  $('notice-close').addEventListener('click', () => ($('notice').hidden = true));
  $('logout').addEventListener('click', () => signOut(null));
  $('conn-retry').addEventListener('click', () => S.client && S.client.reconnectNow());
  $('profile-open').addEventListener('click', openProfile);
  $('profile-close').addEventListener('click', () => $('profile-dialog').close());
  $('profile-form').addEventListener('submit', onProfileSave);
  $('profile-avatar-url').addEventListener('change', previewProfileAvatar);

  $('tab-conversations').addEventListener('click', () => selectTab('conversations'));
  $('tab-people').addEventListener('click', () => selectTab('people'));
  $('tab-conversations').parentElement.addEventListener('keydown', (e) => {
    if (e.key !== 'ArrowLeft' && e.key !== 'ArrowRight') return;
    const next = $('tab-conversations').getAttribute('aria-selected') === 'true' ? 'people' : 'conversations';
    selectTab(next);
    $(`tab-${next}`).focus();
  });
  $('conversations-more').addEventListener('click', () => loadConversations({ more: true }).catch((err) => notify(describeError(err, 'load more conversations'))));
  $('people-more').addEventListener('click', () => loadPeople({ more: true }).catch((err) => notify(describeError(err, 'load more people'))));
  $('people-refresh').addEventListener('click', () => loadPeople().catch((err) => notify(describeError(err, 'refresh the people list'))));
  let searchTimer = null;
  $('people-q').addEventListener('input', () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => loadPeople().catch((err) => notify(describeError(err, 'search'))), 250);
  });
  $('people-search').addEventListener('submit', (e) => e.preventDefault());

  $('new-room').addEventListener('click', () => openRoomDialog('create'));
  $('room-add').addEventListener('click', () => openRoomDialog('add'));
  $('room-leave').addEventListener('click', onLeaveRoom);
  $('room-form').addEventListener('submit', onRoomSubmit);
  $('room-cancel').addEventListener('click', () => $('room-dialog').close());

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

function boot() {
  wire();
  const flash = sessionStorage.getItem(FLASH_KEY);
  if (flash) {
    sessionStorage.removeItem(FLASH_KEY);
    showFormError('login-error', flash);
  }
  route();
}

boot();
