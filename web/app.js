// The page's only code: connect noVNC's RFB client (served from npm's @novnc/novnc under
// /novnc/) to our WebSocket, with the password typed into the form.
import RFB from './novnc/core/rfb.js';

const statusEl = document.getElementById('status');
function status(state, text) {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
}

let rfb = null;
document.getElementById('login').addEventListener('submit', (e) => {
  e.preventDefault();
  if (rfb) rfb.disconnect();
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const password = document.getElementById('password').value;
  status('connecting', 'Connecting…');
  rfb = new RFB(document.getElementById('screen'), `${scheme}://${location.host}/websockify`,
                { credentials: { password } });
  rfb.scaleViewport = false;
  rfb.resizeSession = false;
  rfb.addEventListener('connect', () => { status('connected', 'Connected'); rfb.focus(); });
  rfb.addEventListener('securityfailure', (ev) =>
    status('failed', `Authentication failed: ${ev.detail.reason || ev.detail.status}`));
  rfb.addEventListener('credentialsrequired', () => status('failed', 'Password required'));
  rfb.addEventListener('disconnect', (ev) => {
    if (statusEl.dataset.state !== 'failed') {
      status('disconnected', ev.detail.clean ? 'Disconnected' : 'Connection lost');
    }
  });
  // The guest copied: show the text, and put it on the browser's clipboard where the page may
  // (a secure context with the clipboard-write permission).
  rfb.addEventListener('clipboard', (ev) => {
    clipText.value = ev.detail.text;
    clipText.dataset.from = 'guest';
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(ev.detail.text).catch(() => {});
    }
  });
  window.vdiRfb = rfb;
});

// Paste into the VM: the text box, or the browser's clipboard when the box is empty and the page
// may read it. noVNC sends it as Extended Clipboard (UTF-8) to our server.
const clipText = document.getElementById('clip-text');
document.getElementById('clip-send').addEventListener('click', async () => {
  if (!rfb) return;
  let text = clipText.value;
  if (!text && navigator.clipboard && navigator.clipboard.readText) {
    text = await navigator.clipboard.readText().catch(() => '');
  }
  if (text) {
    rfb.clipboardPasteFrom(text);
    clipText.dataset.from = 'page';
  }
});
