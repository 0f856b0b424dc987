// The sign-in page: posts the token as JSON (the server takes nothing
// else, so no other site's form can sign a browser in) and goes to the
// dashboard; shows the server's message when it refuses.
'use strict';
document.getElementById('login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const err = document.getElementById('login-error');
  err.textContent = '';
  try {
    const r = await fetch('/ui/login', {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ token: document.getElementById('token').value }),
    });
    if (r.ok) {
      location.href = '/ui/';
      return;
    }
    const j = await r.json().catch(() => null);
    err.textContent = j && j.error ? j.error : `sign-in failed: HTTP ${r.status}`;
  } catch (e) {
    err.textContent = `the server could not be reached: ${e}`;
  }
});
