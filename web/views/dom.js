// The page's DOM helpers: finding and building elements, and showing errors and notices where
// the page keeps them (under a field, under a form, in the notice bar).

export const $ = (id) => document.getElementById(id);

/** Builds an element; strings become text nodes, so user data is never parsed as markup. */
export function h(tag, props = {}, ...children) {
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

let noticeTimer = null;
export function notify(text, { sticky = false } = {}) {
  $('notice-text').textContent = text;
  $('notice').hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => ($('notice').hidden = true), 10000);
}

export function showFieldError(id, text) {
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

export function showFormError(id, text) {
  $(id).textContent = text || '';
  $(id).hidden = !text;
}
