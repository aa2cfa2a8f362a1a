// Words a person understands: the sentences for the server's error and field codes, and the
// server's field rules (protocol.md), checked before asking it so that a mistake is explained at
// once, under its field.

import { ApiError } from '../chat-client.js';

const MIN_PASSWORD_CHARS = 8;
const MAX_PASSWORD_BYTES = 1024;
const MAX_NAME_CHARS = 100;
const MAX_EMAIL_BYTES = 254;
const MAX_AVATAR_URL_BYTES = 2048;

export const FIELD_TEXT = {
  name_required: 'Please enter a name.',
  name_invalid: 'Use at most 100 characters, and no control characters.',
  email_invalid: 'Please enter a valid email address, like name@example.com.',
  password_too_short: 'Use at least 8 characters.',
  password_too_long: 'That password is too long.',
  unknown_user: 'One of the people you picked no longer has an account.',
  too_many: 'That is more people than a room can hold.',
  room_limit_reached: 'Someone you picked (or you) is already in too many rooms.',
  room_full: 'This room is full.',
  blocked: 'Someone you picked does not want to be added to this room, or by you.',
  required: 'Pick at least one person.',
  avatar_url_invalid: 'Use the https:// address of a picture, like https://example.com/me.png, with no spaces.',
  avatar_url_host_not_allowed: 'Pictures can only come from the sites this chat allows. Ask your administrator which ones.',
  token_invalid: 'This reset link has expired or was already used.',
};

export const SIGNED_OUT_TEXT = {
  token_expired: 'Your session has expired. Please log in again.',
  token_revoked: 'Your password was changed, so you were logged out here. Please log in with your new password.',
};
export const PASSWORD_CHANGED_TEXT = 'Your password has been changed. Log in with your new password.';

// The server's field rules, checked before asking it.

const utf8Length = (text) => new TextEncoder().encode(text).length;
const BAD_URL_CHARS = /[\p{White_Space}\p{Cc}]/u;

/** The field code for a (trimmed) display name, as for register and PATCH /users/me. */
export function nameProblem(name) {
  if (!name) return 'name_required';
  if ([...name].length > MAX_NAME_CHARS || /\p{Cc}/u.test(name)) return 'name_invalid';
  return null;
}

export function passwordProblem(password) {
  if ([...password].length < MIN_PASSWORD_CHARS) return 'password_too_short';
  if (utf8Length(password) > MAX_PASSWORD_BYTES) return 'password_too_long';
  return null;
}

/** The server's email rule: no whitespace or control characters, one `@` with text before it,
 *  a domain with a dot that does not start or end with one, at most 254 bytes. */
export function emailIsValid(email) {
  if (utf8Length(email) > MAX_EMAIL_BYTES || BAD_URL_CHARS.test(email)) return false;
  const at = email.indexOf('@');
  if (at <= 0) return false;
  const domain = email.slice(at + 1);
  return !domain.includes('@') && domain.includes('.') && !domain.startsWith('.') && !domain.endsWith('.');
}

/** Why an avatar URL would be refused, in words, or null when the server accepts it: an
 *  `https://` URL with a host (no `@` in it), no whitespace or control characters, at most
 *  2,048 bytes. */
export function avatarUrlProblem(url) {
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

export function describeError(err, doing = '') {
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
