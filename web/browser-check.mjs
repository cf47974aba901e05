// Real-browser check driven by tests/web.rs: headless Debian Chromium (playwright-core) opens our
// page, types the password, and reports what it saw as JSON on stdout.
//   node browser-check.mjs URL PASSWORD MODE OUT_DIR
// MODE "view": wait until the canvas equals OUT_DIR/oracle.rgba (W H header line + RGBA bytes),
// then press "a" in the page and screenshot it to OUT_DIR/web-client.png.
// MODE "video": report whether this browser's WebCodecs decode H.264 (`h264`), create
// OUT_DIR/connected once noVNC is connected, wait for OUT_DIR/oracle.rgba (the test writes it
// when the guest's video has ended), then wait like "view" until the canvas equals it.
// MODE "badpass": expect noVNC's authentication failure to show on the page.
// MODE "clipboard": wait until the page's clipboard box shows OUT_DIR/clip-in.txt (what the guest
// copied), then paste OUT_DIR/clip-out.txt into the VM with the page's button and stay until
// OUT_DIR/clip-done exists.
import { chromium } from 'playwright-core';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';

const [url, password, mode, outDir] = process.argv.slice(2);

// Polls the canvas until it shows exactly OUT_DIR/oracle.rgba (or 30 s pass): differing pixels.
async function waitForOracle(page) {
  const raw = readFileSync(`${outDir}/oracle.rgba`);
  const nl = raw.indexOf(10);
  const [w, h] = raw.subarray(0, nl).toString().split(' ').map(Number);
  const oracle = raw.subarray(nl + 1).toString('base64');
  // Poll the canvas until it shows exactly the oracle (or time runs out): count differences.
  const deadline = Date.now() + 30000;
  for (;;) {
    const diff = await page.evaluate(([w, h, b64]) => {
      const c = document.querySelector('#screen canvas');
      if (!c || c.width !== w || c.height !== h) return -1;
      const got = c.getContext('2d').getImageData(0, 0, w, h).data;
      const want = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
      let n = 0;
      for (let i = 0; i < got.length; i += 4) {
        if (got[i] !== want[i] || got[i + 1] !== want[i + 1] || got[i + 2] !== want[i + 2]) n++;
      }
      return n;
    }, [w, h, oracle]);
    result.differing_pixels = diff;
    if (diff === 0 || Date.now() > deadline) break;
    await page.waitForTimeout(250);
  }
}

const result = { mode };
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--ignore-certificate-errors'],
});
try {
  const page = await browser.newPage({ ignoreHTTPSErrors: true, viewport: { width: 1024, height: 700 } });
  // Decoder trouble (noVNC logs it; WebCodecs errors are thrown in callbacks) is reported.
  result.video_problems = [];
  const videoProblem = (t) => /h\.?264|decod|video frame|key frame/i.test(t) && result.video_problems.push(t);
  page.on('console', (m) => {
    process.stderr.write(`console: ${m.text()}\n`);
    if (m.type() === 'warning' || m.type() === 'error') videoProblem(m.text());
  });
  page.on('pageerror', (e) => videoProblem(String(e)));
  await page.goto(url);
  await page.fill('#password', password);
  await page.click('#connect');
  if (mode === 'clipboard') {
    await page.waitForFunction(() => document.getElementById('status').dataset.state === 'connected',
                               null, { timeout: 20000 });
    const want = readFileSync(`${outDir}/clip-in.txt`, 'utf8');
    await page.click('#clipboard summary');
    await page.waitForFunction((w) => document.getElementById('clip-text').value === w,
                               want, { timeout: 30000 }).catch(() => {});
    result.received = await page.inputValue('#clip-text');
    await page.fill('#clip-text', readFileSync(`${outDir}/clip-out.txt`, 'utf8'));
    await page.click('#clip-send');
    // Stay connected (a viewer that leaves releases its copy) until the test says the guest
    // has pasted: it creates OUT_DIR/clip-done.
    const until = Date.now() + 60000;
    while (!existsSync(`${outDir}/clip-done`) && Date.now() < until) {
      await page.waitForTimeout(200);
    }
  } else if (mode === 'video') {
    result.h264 = await page.evaluate(async () => {
      if (!('VideoDecoder' in window)) return false;
      const s = await VideoDecoder.isConfigSupported({ codec: 'avc1.42e01f', codedWidth: 1920,
                                                       codedHeight: 1080, optimizeForLatency: true });
      return s.supported === true;
    });
    await page.waitForFunction(() => document.getElementById('status').dataset.state === 'connected',
                               null, { timeout: 20000 });
    writeFileSync(`${outDir}/connected`, '');
    const until = Date.now() + 90000;
    while (!existsSync(`${outDir}/oracle.rgba`) && Date.now() < until) {
      await page.waitForTimeout(200);
    }
    await waitForOracle(page);
    await page.screenshot({ path: `${outDir}/web-video.png` });
  } else if (mode === 'badpass') {
    await page.waitForFunction(() => document.getElementById('status').dataset.state === 'failed',
                               null, { timeout: 20000 });
    result.status = await page.textContent('#status');
  } else {
    await page.waitForFunction(() => document.getElementById('status').dataset.state === 'connected',
                               null, { timeout: 20000 });
    await waitForOracle(page);
    await page.evaluate(() => window.vdiRfb.focus());
    await page.keyboard.press('a');
    await page.screenshot({ path: `${outDir}/web-client.png` });
  }
} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
