// Forgot and reset password: asking for a reset link, and the page that link opens, which takes
// the token out of the address, asks for the new password twice and confirms it.

import { Api, ApiError } from '../chat-client.js';
import { $, showFieldError, showFormError } from './dom.js';
import { FIELD_TEXT, PASSWORD_CHANGED_TEXT, describeError, emailIsValid, passwordProblem } from './text.js';
import { clearSession } from './session-store.js';
import { base } from './state.js';
import { showAuth, showNote, wirePasswordToggle } from './login.js';

/** A reset link is `<page>#reset_token=<token>`; the token is kept for this tab under this key
 *  until it is used, refused, or the person leaves the reset page. */
const RESET_LINK_PARAM = 'reset_token';
const RESET_KEY = 'chat.reset_token';

/** Replaces the address's fragment without a navigation (and without a hashchange). */
function replaceHash(hash) {
  history.replaceState(null, '', `${location.pathname}${location.search}${hash}`);
}

/** A reset link (`/#reset_token=<token>`): keeps the token for this tab and takes it out of the
 *  address bar (and so out of the history and of bookmarks). */
export function takeResetLink() {
  const token = new URLSearchParams(location.hash.slice(1)).get(RESET_LINK_PARAM);
  if (token === null) return false;
  sessionStorage.setItem(RESET_KEY, token.trim());
  replaceHash('#reset');
  return true;
}

/** Forgets a reset link's token (the person left the reset page). */
export function forgetResetLink() {
  sessionStorage.removeItem(RESET_KEY);
}

// Forgot password: ask for a reset link. The answer is the same whether or not the email has an
// account, so the page says "if an account exists".

export function prepareForgot() {
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

export function prepareReset() {
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

export function wireReset() {
  $('forgot-form').addEventListener('submit', onForgot);
  $('forgot-again').addEventListener('click', () => {
    prepareForgot();
    $('forgot-email').focus();
  });
  $('reset-form').addEventListener('submit', onReset);
  wirePasswordToggle('reset-show', ['reset-password', 'reset-confirm']);
}
