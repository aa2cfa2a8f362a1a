// What the page keeps in the browser's storage between loads: the session ("remember me" keeps
// the token in localStorage, otherwise only for this tab) and the one message the login form
// shows after the page reloads itself on signing out.

const SESSION_KEY = 'chat.session';
const FLASH_KEY = 'chat.flash';

export function loadSession() {
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

export function saveSession(token, user, remember) {
  clearSession();
  (remember ? localStorage : sessionStorage).setItem(SESSION_KEY, JSON.stringify({ token, user }));
}

export function clearSession() {
  localStorage.removeItem(SESSION_KEY);
  sessionStorage.removeItem(SESSION_KEY);
}

/** Keeps the stored copy of the user up to date, so that a reload shows the new name at once. */
export function storeUser(user) {
  for (const store of [localStorage, sessionStorage]) {
    try {
      const s = JSON.parse(store.getItem(SESSION_KEY) || 'null');
      if (s && s.token && s.user && s.user.id === user.id) store.setItem(SESSION_KEY, JSON.stringify({ ...s, user }));
    } catch {
      // a broken entry is dropped by loadSession
    }
  }
}

/** Keeps a message for the login form across the reload that follows signing out. */
export function setFlash(message) {
  sessionStorage.setItem(FLASH_KEY, message);
}

/** The message kept by `setFlash`, once: it is forgotten as it is read. */
export function takeFlash() {
  const flash = sessionStorage.getItem(FLASH_KEY);
  if (flash) sessionStorage.removeItem(FLASH_KEY);
  return flash;
}
