// The log-in and sign-up pages, and showing one auth page at a time (log in, sign up, forgot and
// reset password) while nobody is logged in. A log-in or sign-up starts the session through the
// function app.js passes in: the session module imports this one (to hide these pages).

import { Api, ApiError } from '../chat-client.js';
import { $, showFieldError, showFormError } from './dom.js';
import { FIELD_TEXT, describeError, nameProblem, passwordProblem } from './text.js';
import { saveSession } from './session-store.js';
import { base } from './state.js';

const AUTH_VIEWS = ['login', 'register', 'forgot', 'reset'];
const AUTH_TITLES = { login: 'Log in', register: 'Create an account', forgot: 'Forgot password', reset: 'Choose a new password' };
/** Set by app.js (wireLogin): `startSession(token, user)`, and `prepare`, by page name, what
 *  readies a page each time it is shown (the forgot and reset pages, in reset.js). */
let hooks = null;

export function showAuth(view) {
  $('chat-app').hidden = true;
  $('account').hidden = true;
  for (const v of AUTH_VIEWS) $(`${v}-view`).hidden = v !== view;
  document.title = `${AUTH_TITLES[view]} – Chat`;
  showNote('login-note', '');
  hooks.prepare[view]?.();
  $(`${view}-title`).focus();
}

export function showNote(id, text) {
  $(id).textContent = text || '';
  $(id).hidden = !text;
}

/** Hides every auth page (the session shows the chat instead). */
export function hideAuth() {
  for (const v of AUTH_VIEWS) $(`${v}-view`).hidden = true;
}

export function wirePasswordToggle(checkboxId, inputIds) {
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
    hooks.startSession(res.token, res.user);
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
    hooks.startSession(res.token, res.user);
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

export function wireLogin(fromApp) {
  hooks = fromApp;
  $('login-form').addEventListener('submit', onLogin);
  $('register-form').addEventListener('submit', onRegister);
  wirePasswordToggle('login-show', ['login-password']);
  wirePasswordToggle('register-show', ['register-password', 'register-confirm']);
}
