// The web client's page: the entry module index.html loads. It routes the address to a page and
// wires the views together: each view module (views/) draws one part of the page from the state
// that chat-client.js keeps in step with the server, and where one view's click opens another,
// the function is passed in here, so that no two views import each other. Every piece of text
// from the server or a user is set with textContent, never parsed as HTML.

import { tokenExpiry } from './chat-client.js';
import { $, notify, showFormError } from './views/dom.js';
import { SIGNED_OUT_TEXT, describeError } from './views/text.js';
import { clearSession, loadSession, takeFlash } from './views/session-store.js';
import { S } from './views/state.js';
import { showAuth, wireLogin } from './views/login.js';
import { forgetResetLink, prepareForgot, prepareReset, takeResetLink, wireReset } from './views/reset.js';
import { startSession, wireSession } from './views/session.js';
import { wireProfile } from './views/profile.js';
import { loadPeople, wirePeople } from './views/people.js';
import { wireConversationList } from './views/conversation-list.js';
import { openConversation, openDirect, renderChatHeader, renderSubtitle, wireConversation } from './views/conversation.js';
import { wireRooms } from './views/rooms.js';

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
  forgetResetLink();
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

/** Shows the Chats or the People tab (People is loaded if it is still empty). */
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
  wireLogin({ startSession, prepare: { forgot: prepareForgot, reset: prepareReset } });
  wireReset();
  window.addEventListener('hashchange', route);
  $('notice-close').addEventListener('click', () => ($('notice').hidden = true));
  wireSession();
  wireProfile();

  $('tab-conversations').addEventListener('click', () => selectTab('conversations'));
  $('tab-people').addEventListener('click', () => selectTab('people'));
  $('tab-conversations').parentElement.addEventListener('keydown', (e) => {
    if (e.key !== 'ArrowLeft' && e.key !== 'ArrowRight') return;
    const next = $('tab-conversations').getAttribute('aria-selected') === 'true' ? 'people' : 'conversations';
    selectTab(next);
    $(`tab-${next}`).focus();
  });
  wireConversationList({ openConversation, renderChatHeader });
  wirePeople({ openDirect, renderSubtitle });
  wireRooms();
  wireConversation();
}

function boot() {
  wire();
  const flash = takeFlash();
  if (flash) showFormError('login-error', flash);
  route();
}

boot();
