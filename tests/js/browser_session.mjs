// What the browser tests share: Debian's Chromium launched headless through playwright-core (never a
// downloaded browser), the step timings of a report, and screenshots written to several paths.
// Research use only.

import fs from "node:fs";
import path from "node:path";

import { chromium } from "playwright-core";

const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** A persistent headless context in spec.userDataDir with spec.chromium (default /usr/bin/chromium). */
export function launchChromium(spec, { viewport, timeoutMs, ...options }) {
  return chromium.launchPersistentContext(spec.userDataDir, {
    executablePath: spec.chromium ?? "/usr/bin/chromium",
    headless: true,
    chromiumSandbox: false,
    args: CHROMIUM_FLAGS,
    viewport,
    timeout: timeoutMs,
    ...options,
  });
}

/** A step(name) function recording into report.step and report.timingsMs how long each step took. */
export function stepTimer(report) {
  let lastStepAt = Date.now();
  return (name) => {
    if (report.step) report.timingsMs[report.step] = Date.now() - lastStepAt;
    report.step = name;
    lastStepAt = Date.now();
  };
}

export function writeScreenshots(buffer, paths) {
  for (const target of paths ?? []) {
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(target, buffer);
  }
}
