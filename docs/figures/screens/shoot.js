// One-off check of the rendered API pages (not part of the site or the tests; CI has no browser).
// Build the site, copy it to /tmp/site_shot with MathJax served locally (the CDN URL replaced by
// node_modules/mathjax/es5), then: npm install playwright-core mathjax@3 && node shoot.js '[[file, page, selector, maxHeight], ...]'
// It prints, per page, the typeset formulas, MathJax errors and autorefs links, and saves the screenshots here.
const { chromium } = require('playwright-core');
(async () => {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const shots = JSON.parse(process.argv[2]);
  for (const [file, url, selector, maxHeight] of shots) {
    await page.goto('file:///tmp/site_shot/' + url);
    await page.waitForFunction(() => window.MathJax && MathJax.startup && MathJax.startup.promise);
    await page.evaluate(() => MathJax.startup.promise.then(() => MathJax.typesetPromise()));
    const stats = await page.evaluate(() => ({
      math: document.querySelectorAll('.arithmatex mjx-container').length,
      arith: document.querySelectorAll('.arithmatex').length,
      mjxErrors: document.querySelectorAll('mjx-merror').length,
      links: document.querySelectorAll('a.autorefs-internal').length,
    }));
    console.log(file, JSON.stringify(stats));
    await page.addStyleTag({ content: '.md-header, .md-tabs { display: none !important; }' });
    const el = await page.$(selector);
    const box = await el.boundingBox();
    const scrollY = await page.evaluate(() => window.scrollY);
    await page.screenshot({ path: '/work/wt-docs/docs/figures/screens/' + file, fullPage: true,
      clip: { x: Math.max(box.x - 16, 0), y: box.y + scrollY - 8, width: Math.min(box.width + 32, 1280), height: Math.min(box.height + 16, maxHeight) } });
  }
  await browser.close();
})();
